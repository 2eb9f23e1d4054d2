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
