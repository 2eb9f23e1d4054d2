"""The training objectives' values against hand computations."""

import math

import torch

from autoregembed_fast.method.data import Tokenization
from autoregembed_fast.method.training.objectives import ContrastiveObjective, alignment_terms
from tiny_models import stage2_rows, tiny_tokenizer

# Memory [sequence, k = 2, d = 3] per encoded text, in the objective's order: the 3 queries, the 3
# positives, the 3 negatives. Embeddings are the normalised means of each pair of rows.
MEMORY = torch.tensor([
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], [[0.5, 0.5, 0.5], [0.0, 0.0, 1.0]],
    [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
    [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
])


class FixedMemory:
    """Stands in for the encoder: returns MEMORY for the 9 texts it is given."""

    def __call__(self, input_ids, attention_mask, packed=True):
        assert input_ids.shape[0] == len(MEMORY)
        return MEMORY.clone()


def hand_infonce(temperature: float) -> float:
    """Sum over the 3 queries of -log softmax(cos(q_i, candidates) / T)[i], candidates = the 3
    positives then the 3 negatives, with Python's math."""
    def embedding(i):
        mean = [(a + b) / 2 for a, b in zip(*MEMORY[i].tolist())]
        norm = math.sqrt(sum(x * x for x in mean))
        return [x / norm for x in mean]

    total = 0.0
    for i in range(3):
        query = embedding(i)
        logits = [sum(q * c for q, c in zip(query, embedding(j))) / temperature for j in range(3, 9)]
        total += -(logits[i] - math.log(sum(math.exp(z) for z in logits)))
    return total


def test_contrastive_objective_is_infonce_over_positives_and_hard_negatives():
    rows = stage2_rows(3)
    objective = ContrastiveObjective(tiny_tokenizer(), Tokenization(), rows, temperature=0.05)
    loss, count = objective(FixedMemory(), [0, 1, 2], torch.device("cpu"))
    assert count == 3
    assert abs(loss.item() - hand_infonce(0.05)) < 1e-4 * hand_infonce(0.05)


def test_alignment_terms_by_hand():
    s_qp = torch.tensor([-10.0, -3.0])
    s_pp = torch.tensor([-4.0, -2.5])
    s_qn = torch.tensor([[-12.0, -9.0], [-80.0, -3.5]])
    ref_pos, ref_neg = torch.tensor([-5.0, -4.0]), torch.tensor([[-6.0, -5.0], [-4.0, -4.0]])
    terms = alignment_terms(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta=1.0, reference_sign=1)
    # margin = (s_qp - s_qn) + (r+ - r-): row 0: 2 + 1, -1 + 0; row 1: 77 + 0, 0.5 + 0.
    assert terms["margin"].tolist() == [3.0, -1.0, 77.0, 0.5]
    assert terms["gap"].tolist() == [6.0, 0.5]
    assert terms["s1_saturated"].tolist() == [1.0, 0.0]  # beta * 6 > 4.6
    assert terms["s2_saturated"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert terms["pos_over_neg"].tolist() == [1.0, 0.0, 1.0, 1.0]
    dpo = alignment_terms(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta=1.0, reference_sign=-1)
    assert dpo["margin"].tolist() == [1.0, -1.0, 77.0, 0.5]
