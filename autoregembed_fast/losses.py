"""Generic losses on the fused op, for any causal LM: sequence log-probs, the fused linear
cross-entropy (`linear_cross_entropy`, `LinearCrossEntropyLoss`) and the op as a module
(`TokenLogprobs`). AutoRegEmbed's own losses are in `autoregembed_fast.method.losses`."""

from __future__ import annotations

import torch
from torch import nn

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
    stage-1 loss is this loss (``autoregembed_fast.method.losses.CompressionLoss``)."""

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
