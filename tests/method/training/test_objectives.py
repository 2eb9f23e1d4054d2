"""The training objectives' values against hand computations."""

import math

import pytest
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


@torch.no_grad()
def summed_logprob(decoder, memory, tokens) -> float:
    """log p(tokens | memory) through the decoder's own forward and log-softmax, in float64."""
    inputs = torch.cat([memory, decoder.get_input_embeddings()(tokens)])[None]
    logits = decoder(inputs_embeds=inputs).logits[0].double()
    k = memory.shape[0]
    logp = torch.log_softmax(logits[k - 1 : k - 1 + len(tokens)], dim=-1)
    return float(logp.gather(1, tokens[:, None]).sum())


@pytest.mark.parametrize("hard", [False, True], ids=["positives", "positives-and-hard-negatives"])
def test_in_batch_negatives_are_scored_under_the_querys_memory_without_a_reference_term(hard):
    """3 rows, 1 hard negative each: the loss is the released formula over [hard negative, the 2 other
    rows' positives (, the 2 other rows' hard negatives)], each scored under the query's memory, the
    cached reference term on the row's own hard negative only."""
    from autoregembed_fast.method.data import target_ids
    from autoregembed_fast.method.losses import AlignmentLoss
    from autoregembed_fast.method.training.objectives import AlignmentObjective
    from autoregembed_fast.method.training.references import References
    from tiny_models import tiny_llama

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    decoder = tiny_llama(vocab_size=len(tokenizer), hidden_size=8).eval()
    for weight in decoder.parameters():
        weight.data.mul_(20.0)  # logits that depend on the memory
    rows = stage2_rows(3)
    ref_pos, ref_neg = torch.tensor([-30.0, -25.0, -28.0]), torch.tensor([[-31.0], [-20.0], [-29.5]])
    references = References(rows, ref_pos, ref_neg)
    loss = AlignmentLoss(beta=0.1, temperature=0.1)
    objective = AlignmentObjective(decoder, tokenizer, Tokenization(), loss, references, average=False,
                                   in_batch_negatives=True, in_batch_hard_negatives=hard)
    memory = torch.randn(6, 2, 8)  # 3 queries then 3 positives (k = 2, d = 8)

    class QueriesThenPositives:
        def __call__(self, input_ids, attention_mask, packed=True):
            assert input_ids.shape[0] == 6
            return memory.clone()

    value, count = objective(QueriesThenPositives(), [0, 1, 2], torch.device("cpu"))
    assert count == 3

    def score(text, memory_row):
        tokens = torch.tensor(target_ids(tokenizer, text, Tokenization()))
        return summed_logprob(decoder, memory[memory_row], tokens)

    terms = []
    for i, row in enumerate(rows):
        s_qp, s_pp = score(row["pos"], i), score(row["pos"], 3 + i)
        s1 = 1 / (1 + math.exp(-0.1 * abs(s_qp - s_pp)))
        negatives = [(score(row["neg"], i), float(ref_pos[i] - ref_neg[i, 0]))]
        negatives += [(score(rows[j]["pos"], i), 0.0) for j in range(3) if j != i]
        if hard:
            negatives += [(score(rows[j]["neg"], i), 0.0) for j in range(3) if j != i]
        for s_qn, reference in negatives:
            s2 = 1 / (1 + math.exp(-0.1 * ((s_qp - s_qn) + reference)))
            terms.append(math.log1p(math.exp((s1 - s2) / 0.1)))
    expected = sum(terms) / len(terms) * 3  # the objective returns the sum over its 3 rows
    assert abs(value.item() - expected) < 1e-4 * abs(expected)
