"""`python -m bench`: part 1, the op against the anchors (bench/op.py; its options are accepted
here too), on a CPU with AVX512-BF16 once more with bf16 inputs; then part 2, a stage-2 training step
released-style vs ours (bench/method/train_step.py)."""

import sys

import torch

from bench import op
from bench.method import train_step

argv = sys.argv[1:]
op.main(argv)
if not torch.cuda.is_available() and "--dtype" not in argv:
    from autoregembed_fast.backends import cpu_bf16_gemm

    print()
    if cpu_bf16_gemm():
        op.main([*argv, "--dtype", "bfloat16"])
    else:
        print("bf16 rows skipped: this CPU has no AVX512-BF16 (lscpu flag avx512_bf16), so bf16 "
              "GEMMs are emulated here and the CPU backend upcasts bf16 inputs to fp32")
print()
train_step.main([])
