"""Float64 ground truth for the tests and the benchmarks, written independently of the package: an
explicit max-shifted log-sum-exp, no log_softmax, no code from autoregembed_fast."""

import torch


def token_logprobs_oracle(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    """log p[target] per token in float64 for hidden [..., d], weight [V, d], targets [...].

    Differentiable (the float64 casts keep the graph), so autograd through it gives oracle gradients.
    Ignored targets score 0.
    """
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    row_max = logits.max(dim=-1, keepdim=True).values.detach()
    lse = row_max.squeeze(-1) + torch.log(torch.exp(logits - row_max).sum(dim=-1))
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, target_logit - lse, torch.zeros_like(lse))


def oracle_grads(hidden, weight, targets, grad_out, bias=None, ignore_index=-100, softcap=None):
    """Float64 gradients of sum(grad_out * logp) w.r.t. (hidden, weight, bias)."""
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    logp = token_logprobs_oracle(hidden64, weight64, targets, bias64, ignore_index, softcap)
    inputs = [hidden64, weight64] + ([] if bias64 is None else [bias64])
    grads = torch.autograd.grad((logp * grad_out.double()).sum(), inputs)
    return grads[0], grads[1], (None if bias64 is None else grads[2])


def logit_coefficients(hidden, weight, targets, grad_out, bias=None, ignore_index=-100, softcap=None):
    """G [N, V] float64 = d sum(grad_out * logp) / d logits (before the softcap): the coefficients
    every backward multiplies by W (for grad_hidden), by H (for grad_weight) or sums (for grad_bias)."""
    d = hidden.shape[-1]
    raw = (hidden.detach().double().reshape(-1, d) @ weight.detach().double().t())
    if bias is not None:
        raw = raw + bias.detach().double()
    raw.requires_grad_()
    logits = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    row_max = logits.max(dim=-1, keepdim=True).values.detach()
    lse = row_max.squeeze(-1) + torch.log(torch.exp(logits - row_max).sum(dim=-1))
    flat_targets = targets.reshape(-1)
    keep = flat_targets != ignore_index
    safe = torch.where(keep, flat_targets, torch.zeros_like(flat_targets)).long()
    logp = torch.where(keep, logits.gather(-1, safe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    (coefficients,) = torch.autograd.grad((logp * grad_out.reshape(-1).double()).sum(), raw)
    return coefficients


def rounding_bounds(hidden, weight, targets, grad_out, unit, bias=None, ignore_index=-100,
                    softcap=None):
    """Per-element error bounds (float64) on (grad_hidden, grad_weight, grad_bias) of a backward that
    rounds its coefficients G with relative error at most `unit` (eps / 2 of the 16-bit dtype when
    rounding to nearest) and multiplies them with fp32 accumulation: |dG| <= unit |G|, so
    |d(G @ W)| <= unit |G| @ |W|, |d(G^T @ H)| <= unit |G|^T @ |H| and |d sum_t G| <= unit sum_t |G|.
    Derived from the rounding and the float64 inputs alone."""
    d = hidden.shape[-1]
    magnitude = logit_coefficients(hidden, weight, targets, grad_out, bias, ignore_index,
                                   softcap).abs()
    flat_hidden = hidden.detach().double().reshape(-1, d).abs()
    return (unit * (magnitude @ weight.detach().double().abs()).reshape(hidden.shape),
            unit * magnitude.t() @ flat_hidden,
            None if bias is None else unit * magnitude.sum(dim=0))
