"""The stage-2 alignment loss against the released code's formula, its gradients at extreme inputs
and its input checks."""

import math

import pytest
import torch

from autoregembed_fast.method.losses import AlignmentLoss, alignment_loss


def transcribed_alignment_loss(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta, tau, sign):
    """The released formula, element by element in float64 with Python's math."""
    losses = []
    for b in range(len(s_qp)):
        s1 = 1 / (1 + math.exp(-beta * abs(s_qp[b] - s_pp[b])))
        for j in range(len(s_qn[b])):
            margin = (s_qp[b] - s_qn[b][j]) + sign * (ref_pos[b] - ref_neg[b][j])
            s2 = 1 / (1 + math.exp(-beta * margin))
            losses.append(-math.log(math.exp(-s1 / tau) / (math.exp(-s1 / tau) + math.exp(-s2 / tau))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n_negatives", [1, 3])
@pytest.mark.parametrize("sign", [1, -1], ids=["released", "dpo"])
@pytest.mark.parametrize("beta,tau", [(0.1, 0.1), (1.0, 0.05)])
def test_alignment_loss_equals_released_formula(n_negatives, sign, beta, tau):
    batch = 5
    # Sequence log-probs of tens of nats, as real ones are.
    s_qp, s_pp, ref_pos = (-30 * torch.rand(batch, dtype=torch.float64) for _ in range(3))
    s_qn, ref_neg = (-30 * torch.rand(batch, n_negatives, dtype=torch.float64) for _ in range(2))
    expected = transcribed_alignment_loss(s_qp.tolist(), s_pp.tolist(), s_qn.tolist(),
                                          ref_pos.tolist(), ref_neg.tolist(), beta, tau, sign)
    actual = AlignmentLoss(beta, tau, sign)(s_qp, s_pp, s_qn, ref_pos, ref_neg)
    assert actual.dim() == 0
    assert math.isclose(actual.item(), expected, rel_tol=1e-12)


def test_alignment_weight_scales_the_alignment_term_about_its_minimum():
    """Worked by hand: beta = 1, s_qp - s_pp = ln 3 gives sigmoid(ln 3) = 3/4, which weight 1/2 takes
    to 1/2 + (3/4 - 1/2) / 2 = 5/8; a zero margin gives s2 = 1/2; with tau = 1/8 the loss is
    softplus((5/8 - 1/2) * 8) = ln(1 + e). Its gradient in s_pp is -sigmoid(1) * 8 * (1/2) *
    (3/4 * 1/4) = -(3/4) e / (1 + e); weight 0 leaves s_pp without any."""
    def scores():
        return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (
            [math.log(3)], [0.0], [[math.log(3)]], [0.0], [[0.0]])]

    inputs = scores()
    s_pp = inputs[1]
    loss = alignment_loss(*inputs, beta=1.0, temperature=0.125, alignment_weight=0.5)
    loss.backward()
    assert math.isclose(loss.item(), math.log(1 + math.e), rel_tol=1e-12)
    assert math.isclose(s_pp.grad.item(), -0.75 * math.e / (1 + math.e), rel_tol=1e-12)

    inputs = scores()
    s_pp = inputs[1]
    loss = alignment_loss(*inputs, beta=1.0, temperature=0.125, alignment_weight=0.0)
    loss.backward()
    assert math.isclose(loss.item(), math.log(1 + math.exp(0.0)), rel_tol=1e-12)  # softplus(0)
    assert s_pp.grad.item() == 0.0


def test_alignment_loss_finite_gradients_for_extreme_inputs():
    scores = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (
        [1e4, -1e4, 3.0], [-1e4, 1e4, 3.0], [[1e4, -1e4], [-1e4, 1e4], [0.0, 5.0]],
        [1e4, 0.0, -1e4], [[-1e4, 1e4], [1e4, -1e4], [2.0, 2.0]])]
    loss = alignment_loss(*scores)
    loss.backward()
    assert torch.isfinite(loss)
    for score in scores:
        assert torch.isfinite(score.grad).all()


def test_alignment_loss_bad_input():
    good = dict(s_qp=torch.zeros(4), s_pp=torch.zeros(4), s_qn=torch.zeros(4, 2),
                ref_pos=torch.zeros(4), ref_neg=torch.zeros(4, 2))
    for name, value, message in [
        ("s_qp", torch.zeros(4, 1), "s_qp"), ("s_pp", torch.zeros(3), "s_pp"),
        ("s_qn", torch.zeros(4), "s_qn"), ("ref_pos", torch.zeros(5), "ref_pos"),
        ("ref_neg", torch.zeros(4, 3), "ref_neg"),
    ]:
        with pytest.raises(ValueError, match=message):
            alignment_loss(**{**good, name: value})
    with pytest.raises(ValueError, match="reference_sign"):
        AlignmentLoss(reference_sign=0)
    with pytest.raises(ValueError, match="positive"):
        alignment_loss(**good, temperature=0.0)
    for weight in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alignment_weight"):
            AlignmentLoss(alignment_weight=weight)
