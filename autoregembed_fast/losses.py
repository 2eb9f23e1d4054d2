"""Drop-in losses of AutoRegEmbed built on the fused op: sequence log-probs, the compression
(cross-entropy) loss and the conditional-distribution alignment loss of the released code."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from autoregembed_fast.ops import summed_token_logprobs, token_logprobs

REDUCTIONS = ("mean", "sum", "none")


def _shifted(hidden: torch.Tensor, labels: torch.Tensor, shift: bool):
    """Checks hidden [..., d] against labels [...]; with shift (the causal-LM convention) position t
    of the last label axis scores labels[..., t + 1]."""
    if hidden.dim() < 1 or tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"expected hidden [..., d] and labels [...] with the same leading shape, got "
            f"{tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        if labels.dim() < 1:
            raise ValueError("shift=True needs a sequence axis: labels [..., T]")
        return hidden[..., :-1, :], labels[..., 1:]
    return hidden, labels


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    average: bool = False,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens: ``[B]`` float32.

    ``hidden [B, T, d]`` are the decoder's last hidden states, ``labels [B, T]`` the token ids with
    ``ignore_index`` where nothing is scored. With ``shift`` (the causal-LM convention) position ``t``
    scores ``labels[:, t + 1]``. Returns the sum of the per-token log-probs, or with ``average`` their
    mean over the scored tokens; this is the released code's ``_get_batch_logps`` on the logits
    ``hidden @ weight.T + bias``, without materialising them. Differentiable like `token_logprobs`.

    Raises ValueError for mismatched shapes, and with ``average`` for a row with no scored token.
    """
    hidden, labels = _shifted(hidden, labels, shift)
    logp = token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                          softcap=softcap, backend=backend)
    total = logp.sum(dim=-1)
    if not average:
        return total
    counts = (labels != ignore_index).sum(dim=-1)
    # The check synchronises with the device: eager only (compiled, an empty row gives NaN).
    if not torch.compiler.is_compiling() and bool((counts == 0).any()):
        empty = (counts == 0).nonzero()[0].item()
        raise ValueError(f"row {empty} has no scored token: its average log-probability is undefined")
    return total / counts


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Token cross-entropy of ``labels [...]`` under the head ``weight [V, d]`` (+ ``bias``) applied to
    ``hidden [..., d]`` (any leading shape, e.g. ``[N, d]`` or ``[B, T, d]``), without materialising
    the logits.

    With ``shift`` (the default, the causal-LM convention) the last label axis is the sequence:
    position ``t`` scores ``labels[..., t + 1]``. ``reduction="mean"`` averages over the scored
    (non-ignored) tokens, which is what a Hugging Face causal LM returns as ``loss`` for the same
    labels; a batch with no scored token gives 0 (not torch's NaN), so that an empty micro-batch
    cannot poison a run. ``"sum"`` sums, and ``"none"`` returns the per-token losses (``[B, T - 1]``
    for ``[B, T]`` labels with shift), 0 where ignored.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    hidden, labels = _shifted(hidden, labels, shift)
    if reduction == "none":
        return -token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               softcap=softcap, backend=backend)
    # A scalar loss: every token's upstream gradient is the same number, so the gradients are formed
    # in the forward sweep (no recompute for a trainable head).
    total = -summed_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   softcap=softcap, backend=backend)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


class LinearCrossEntropyLoss(nn.Module):
    """`linear_cross_entropy` as a module: ``loss(hidden, weight, labels, bias=None)``. AutoRegEmbed's
    stage-1 loss (token cross-entropy of the target given the memory, from the frozen decoder's hidden
    states and its head) is this loss, also exported as ``CompressionLoss``."""

    def __init__(self, *, shift: bool = True, reduction: str = "mean", ignore_index: int = -100,
                 softcap: float | None = None, backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.shift = shift
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.backend = backend

    def forward(self, hidden, weight, labels, bias=None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, shift=self.shift,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    softcap=self.softcap, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"shift={self.shift}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"softcap={self.softcap}, backend={self.backend!r}")


# The method's name for the same loss (stage 1: information compression).
CompressionLoss = LinearCrossEntropyLoss


class TokenLogprobs(nn.Module):
    """`token_logprobs` as a module: ``module(hidden, weight, targets, bias=None)`` -> log p per token."""

    def __init__(self, *, ignore_index: int = -100, softcap: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.backend = backend

    def forward(self, hidden, weight, targets, bias=None):
        return token_logprobs(hidden, weight, targets, bias=bias, ignore_index=self.ignore_index,
                              softcap=self.softcap, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, softcap={self.softcap}, backend={self.backend!r}"


def _check_alignment_settings(beta, temperature, reference_sign) -> None:
    if reference_sign not in (1, -1):
        raise ValueError(f"reference_sign must be +1 or -1, got {reference_sign!r}")
    if not (beta > 0 and temperature > 0):
        raise ValueError(f"beta and temperature must be positive, got {beta} and {temperature}")


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
    ``(s_qp - s_qn) - (ref_pos - ref_neg)``. Computed with softplus, stable for any finite input.
    """
    _check_alignment_settings(beta, temperature, reference_sign)
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
    alignment = torch.sigmoid(beta * (s_qp - s_pp).abs())[:, None]
    return F.softplus((alignment - uniformity) / temperature).mean()


class AlignmentLoss(nn.Module):
    """`alignment_loss` as a module (β = 0.1, τ = 0.1 and the released code's reference sign by
    default)."""

    def __init__(self, beta: float = 0.1, temperature: float = 0.1, reference_sign: int = 1):
        super().__init__()
        _check_alignment_settings(beta, temperature, reference_sign)
        self.beta = beta
        self.temperature = temperature
        self.reference_sign = reference_sign

    def forward(self, s_qp, s_pp, s_qn, ref_pos, ref_neg):
        return alignment_loss(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta=self.beta,
                              temperature=self.temperature, reference_sign=self.reference_sign)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reference_sign={self.reference_sign}"
