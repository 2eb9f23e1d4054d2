"""The losses of AutoRegEmbed: stage 1's compression loss (the generic linear cross-entropy under
the method's name) and stage 2's conditional-distribution alignment loss of the released code."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from autoregembed_fast.losses import LinearCrossEntropyLoss

# Stage 1 (information compression): token cross-entropy of the target given the memory, from the
# frozen decoder's hidden states and its head.
CompressionLoss = LinearCrossEntropyLoss


def _check_alignment_settings(beta, temperature, reference_sign, alignment_weight) -> None:
    if reference_sign not in (1, -1):
        raise ValueError(f"reference_sign must be +1 or -1, got {reference_sign!r}")
    if not (beta > 0 and temperature > 0):
        raise ValueError(f"beta and temperature must be positive, got {beta} and {temperature}")
    if not 0 <= alignment_weight < float("inf"):
        raise ValueError(f"alignment_weight must be finite and >= 0, got {alignment_weight}")


def alignment_loss(
    s_qp: torch.Tensor,
    s_pp: torch.Tensor,
    s_qn: torch.Tensor,
    ref_pos: torch.Tensor,
    ref_neg: torch.Tensor,
    *,
    beta: float = 0.1,
    temperature: float = 0.1,
    reference_sign: int = 1,
    alignment_weight: float = 1.0,
) -> torch.Tensor:
    """Stage-2 conditional-distribution alignment loss of the released AutoRegEmbed code (scalar).

    Inputs are sequence log-probs: ``s_qp [B]`` = log p(pos | M_query), ``s_pp [B]`` = log p(pos | M_pos),
    ``s_qn [B, n]`` = log p(neg_j | M_query), and the frozen stage-1 model's reference scores
    ``ref_pos [B]``, ``ref_neg [B, n]``. Per example and negative::

        margin = (s_qp - s_qn_j) + reference_sign * (ref_pos - ref_neg_j)
        s2     = sigmoid(beta * margin)              # uniformity: push the negative away
        s1     = sigmoid(beta * |s_qp - s_pp|)       # alignment: query and positive agree
        loss   = -log(exp(-s1/τ) / (exp(-s1/τ) + exp(-s2/τ))) = softplus((s1 - s2) / τ)

    averaged over the batch and the negatives (``[B, 1]`` against ``[B, n]`` broadcasting, as the
    released code). ``reference_sign=+1`` is the released code's sign; ``-1`` gives the DPO convention
    ``(s_qp - s_qn) - (ref_pos - ref_neg)``. ``alignment_weight`` w (not in the released code, which
    is w = 1) scales s1's departure from its value at perfect alignment, ``s1 = 1/2 + w (s1 - 1/2)``:
    the alignment term's gradient is w times the released one's, and w = 0 scores every pair as
    aligned, leaving the uniformity term alone. Computed with softplus, stable for any finite input.
    """
    _check_alignment_settings(beta, temperature, reference_sign, alignment_weight)
    if s_qp.dim() != 1:
        raise ValueError(f"s_qp must have shape [B], got {tuple(s_qp.shape)}")
    batch = s_qp.shape[0]
    for name, value in (("s_pp", s_pp), ("ref_pos", ref_pos)):
        if tuple(value.shape) != (batch,):
            raise ValueError(f"{name} must have shape [B] = ({batch},), got {tuple(value.shape)}")
    if s_qn.dim() != 2 or s_qn.shape[0] != batch:
        raise ValueError(f"s_qn must have shape [B, n] with B = {batch}, got {tuple(s_qn.shape)}")
    if tuple(ref_neg.shape) != tuple(s_qn.shape):
        raise ValueError(f"ref_neg must have the shape of s_qn {tuple(s_qn.shape)}, got "
                         f"{tuple(ref_neg.shape)}")
    margin = (s_qp[:, None] - s_qn) + reference_sign * (ref_pos[:, None] - ref_neg)
    uniformity = torch.sigmoid(beta * margin)
    alignment = 0.5 + alignment_weight * (torch.sigmoid(beta * (s_qp - s_pp).abs())[:, None] - 0.5)
    return F.softplus((alignment - uniformity) / temperature).mean()


class AlignmentLoss(nn.Module):
    """`alignment_loss` as a module (β = 0.1, τ = 0.1, the released code's reference sign and
    alignment weight 1 by default)."""

    def __init__(self, beta: float = 0.1, temperature: float = 0.1, reference_sign: int = 1,
                 alignment_weight: float = 1.0):
        super().__init__()
        _check_alignment_settings(beta, temperature, reference_sign, alignment_weight)
        self.beta = beta
        self.temperature = temperature
        self.reference_sign = reference_sign
        self.alignment_weight = alignment_weight

    def forward(self, s_qp, s_pp, s_qn, ref_pos, ref_neg):
        return alignment_loss(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta=self.beta,
                              temperature=self.temperature, reference_sign=self.reference_sign,
                              alignment_weight=self.alignment_weight)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, "
                f"reference_sign={self.reference_sign}, alignment_weight={self.alignment_weight}")
