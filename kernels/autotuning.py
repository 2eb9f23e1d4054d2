"""The autotuning set-up the kernel families share: one autotuner per operand kind ("16-bit":
tensor-core dots, "fp32": exact dots), each over its own configs and keyed on (D, V, bucket of N)
and the dtypes; under the interpreter one config with large tiles (its cost grows with the number
of tile steps, not their size)."""

import triton

from autoregembed_fast.kernels import INTERPRETING

AUTOTUNE_KEY = ["D", "V", "n_bucket"]


def autotuned(kernel, configs, **options):
    """`kernel` behind an autotuner over `configs`, keyed on `AUTOTUNE_KEY`; `options` go to
    `triton.autotune` (`reset_to_zero` for outputs accumulated with atomics, `do_bench`)."""
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, **options)(kernel)


def tuned_by_operand_kind(kernel, configs_16bit, configs_fp32, interpreter_configs, **options) -> dict:
    """{"16-bit": autotuner, "fp32": autotuner} of `kernel` (`operand_kind` picks one per call)."""
    return {kind: autotuned(kernel, interpreter_configs if INTERPRETING else configs, **options)
            for kind, configs in (("16-bit", configs_16bit), ("fp32", configs_fp32))}
