"""The op package stands apart from the method: importing it (and using its public names) loads
nothing of `autoregembed_fast.method`, while the method's public names stay importable from the top."""

import subprocess
import sys


def modules_after(code: str) -> list[str]:
    program = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_op_package_imports_nothing_of_the_method():
    loaded = modules_after(
        "import autoregembed_fast\n"
        "from autoregembed_fast import token_logprobs, linear_cross_entropy, patch_model\n"
        "import torch\n"
        "h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))\n"
        "token_logprobs(h, w, y); linear_cross_entropy(h, w, y, shift=False)")
    assert "autoregembed_fast.ops" in loaded and "autoregembed_fast.huggingface" in loaded
    assert [name for name in loaded if name.startswith("autoregembed_fast.method")] == []


def test_the_methods_public_names_load_it_on_first_use():
    loaded = modules_after("from autoregembed_fast import score_targets, AlignmentLoss, CompressionLoss")
    assert "autoregembed_fast.method.scoring" in loaded and "autoregembed_fast.method.losses" in loaded
    import autoregembed_fast
    from autoregembed_fast.method.scoring import score_targets

    assert autoregembed_fast.score_targets is score_targets
    try:
        autoregembed_fast.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name was found")
