from autoregembed_fast.hardware import cpu_flags, native_bf16_flags


def write_cpuinfo(path, flags):
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    sapphire = write_cpuinfo(tmp_path / "a", "fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16")
    epyc_avx512 = write_cpuinfo(tmp_path / "b", "fpu avx2 avx512f avx512_bf16")
    epyc_avx2 = write_cpuinfo(tmp_path / "c", "fpu avx2 fma")
    assert native_bf16_flags(sapphire) == ["amx_bf16", "avx512_bf16"]
    assert native_bf16_flags(epyc_avx512) == ["avx512_bf16"]
    assert native_bf16_flags(epyc_avx2) == []
    assert "fma" in cpu_flags(epyc_avx2)


def test_no_cpuinfo_means_no_flags(tmp_path):
    assert cpu_flags(tmp_path / "missing") == set()
    assert native_bf16_flags(tmp_path / "missing") == []
