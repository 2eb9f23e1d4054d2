"""Evaluation metrics against direct computations."""

import torch

from autoregembed_fast.evaluate import average_ranks, main, spearman, triplet_accuracy
from tiny_models import save_tiny_base, stage2_rows, write_jsonl


def test_spearman_without_ties_equals_the_rank_difference_formula():
    x, y = torch.randn(40), torch.randn(40)
    rank_x = torch.argsort(torch.argsort(x)).double()
    rank_y = torch.argsort(torch.argsort(y)).double()
    n = 40
    expected = 1 - 6 * ((rank_x - rank_y) ** 2).sum().item() / (n * (n * n - 1))
    assert abs(spearman(x, y) - expected) < 1e-12


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_triplet_accuracy_counts_rows_whose_positive_beats_every_negative():
    vectors = {"q": [1.0, 0.0], "p": [0.9, 0.1], "n": [0.0, 1.0], "far": [-1.0, 0.0],
               "close": [1.0, 0.01]}

    def embed(texts):
        return torch.nn.functional.normalize(torch.tensor([vectors[t] for t in texts]), dim=-1)

    rows = [{"query": "q", "pos": "p", "neg": "n"},          # correct
            {"query": "q", "pos": "n", "neg": "p"},          # wrong
            {"query": "q", "pos": "p", "neg": ["far", "n"]},  # correct against both
            {"query": "q", "pos": "p", "neg": ["far", "close"]}]  # one negative wins
    assert triplet_accuracy(embed, rows) == 0.5


def test_cli_on_a_tiny_model(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    triplets = write_jsonl(tmp_path / "triplets.jsonl", stage2_rows(10))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"text1": row["query"], "text2": row["pos"], "score": float(i)}
        for i, row in enumerate(stage2_rows(8))])
    for pooling in ("memory", "last-token"):
        results = main(["--encoder", str(base), "--triplets", str(triplets), "--pairs", str(pairs),
                        "--pooling", pooling])
        assert 0.0 <= results["triplet_accuracy"] <= 1.0 and results["triplets"] == 10
        assert -1.0 <= results["spearman"] <= 1.0 and results["pairs"] == 8
