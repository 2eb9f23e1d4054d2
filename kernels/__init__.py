"""Triton kernels of autoregembed_fast, installed as the subpackage `autoregembed_fast.kernels`.

One kernel family per module: `lse_forward` (fused log-sum-exp + target logit), `logits_backward`
(recompute backward / fused Jacobian), `logits_epilogue` (epilogue of the chunked route); device
helpers in `tl_utils`. Importing this package does not import triton.
"""

import os

# Under TRITON_INTERPRET=1 (CPU tests) the kernels run on CPU tensors through the interpreter, where
# tl.dot on bf16/fp16 operands returns garbage (upstream bug): the kernels upcast tiles to fp32 there,
# and keep low-precision tensor-core dots on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
