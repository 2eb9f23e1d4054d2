"""Evaluation metrics against direct computations."""

import torch

import math

import pytest

from autoregembed_fast.method.data import DataError, read_sts_b
from autoregembed_fast.method.embedders import build_embedder
from autoregembed_fast.method.evaluate import (
    average_ranks,
    bootstrap_interval,
    main,
    spearman,
    triplet_correct,
)
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
    assert average_ranks(torch.tensor([2.0, 2.0, 2.0, 0.0, 5.0, 0.0])).tolist() == [
        4.0, 4.0, 4.0, 1.5, 6.0, 1.5]


def test_spearman_with_ties_is_pearson_of_average_ranks():
    x = torch.randint(0, 5, (60,)).double()
    y = x + torch.randint(0, 3, (60,)).double()
    rx, ry = average_ranks(x), average_ranks(y)
    expected = torch.corrcoef(torch.stack([rx, ry]))[0, 1].item()
    assert abs(spearman(x, y) - expected) < 1e-12


def test_bootstrap_interval_of_a_proportion_matches_the_normal_approximation():
    correct = torch.zeros(400, dtype=torch.float64)
    correct[:120] = 1.0  # p = 0.3
    low, high = bootstrap_interval(lambda i: float(correct[i].mean()), 400, samples=2000)
    half_width = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert low < 0.3 < high
    assert abs((high - low) / 2 - half_width) < 0.1 * half_width
    assert bootstrap_interval(lambda i: 0.0, 10, samples=0) is None


def test_read_sts_b(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("main-captions\tMSRvid\t2012test\t0000\t5.000\tA man.\tA person.\n"
                    "main-forums\tx\t2015\t0001\t1.25\tOne.\tTwo.\textra\tcolumns\n")
    assert read_sts_b(path) == [{"text1": "A man.", "text2": "A person.", "score": 5.0},
                                {"text1": "One.", "text2": "Two.", "score": 1.25}]
    path.write_text("a\tb\tc\td\tnot-a-score\tx\ty\n")
    with pytest.raises(DataError, match="sts.csv:1"):
        read_sts_b(path)


def test_triplet_correct_marks_rows_whose_positive_beats_every_negative():
    vectors = {"q": [1.0, 0.0], "p": [0.9, 0.1], "n": [0.0, 1.0], "far": [-1.0, 0.0],
               "close": [1.0, 0.01]}

    def embed(texts):
        return torch.nn.functional.normalize(torch.tensor([vectors[t] for t in texts]), dim=-1)

    rows = [{"query": "q", "pos": "p", "neg": "n"},          # correct
            {"query": "q", "pos": "n", "neg": "p"},          # wrong
            {"query": "q", "pos": "p", "neg": ["far", "n"]},  # correct against both
            {"query": "q", "pos": "p", "neg": ["far", "close"]}]  # one negative wins
    assert triplet_correct(embed, rows).tolist() == [True, False, True, False]


def test_cli_on_a_tiny_model(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    triplets = write_jsonl(tmp_path / "triplets.jsonl", stage2_rows(10))
    pair_rows = [{"text1": row["query"], "text2": row["pos"], "score": float(i)}
                 for i, row in enumerate(stage2_rows(8))]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows)
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(f"g\tf\ty\t{i:04d}\t{row['score']}\t{row['text1']}\t{row['text2']}\n"
                           for i, row in enumerate(pair_rows)))
    for pooling in ("memory", "last-token"):
        results = main(["--encoder", str(base), "--triplets", str(triplets), "--pairs", str(pairs),
                        "--sts-b", str(sts), "--pooling", pooling, "--bootstrap", "50"])
        assert results["triplets"] == 10 and results["spearman_pairs"] == 8
        # The same pairs read from JSONL and from the STS-B CSV give the same correlation.
        assert results["sts_b_spearman"] == results["spearman"]
        # The accuracy is the share of rows whose query is closer to its positive than to its
        # negative, from the embedder's vectors; the intervals hold the point estimates.
        torch.manual_seed(0)
        embed = build_embedder(str(base), pooling, 5, 32)
        rows = stage2_rows(10)
        query, positive, negative = (embed([row[key] for row in rows]) for key in ("query", "pos", "neg"))
        expected = ((query * positive).sum(1) > (query * negative).sum(1)).double().mean().item()
        assert results["triplet_accuracy"] == pytest.approx(expected, abs=1e-12)
        low, high = results["triplet_accuracy_ci95"]
        assert low <= results["triplet_accuracy"] <= high
        low, high = results["spearman_ci95"]
        assert low <= results["spearman"] <= high


def test_embeddings_do_not_depend_on_batching(tmp_path):
    """Texts are batched by length; each text's embedding is the one it gets alone."""
    from autoregembed_fast.method.embedders import build_embedder

    base = save_tiny_base(tmp_path / "base")
    texts = [row["query"] + " x" * i for i, row in enumerate(stage2_rows(7))]
    for pooling in ("memory", "last-token"):
        torch.manual_seed(0)
        embed = build_embedder(str(base), pooling, 3, batch_size=3)
        together = embed(texts)
        alone = torch.cat([embed([text]) for text in texts])
        assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_bf16_embeds_every_text_under_bf16_autocast(tmp_path, monkeypatch, bf16):
    from autoregembed_fast.method import evaluate

    base = save_tiny_base(tmp_path / "base")
    triplets = write_jsonl(tmp_path / "triplets.jsonl", stage2_rows(6))
    autocast_states = []
    real_builder = evaluate.build_embedder

    def recording_builder(*args):
        embed = real_builder(*args)

        def recording_embed(texts):
            autocast_states.append((torch.is_autocast_enabled("cpu"),
                                    torch.get_autocast_dtype("cpu")))
            return embed(texts)
        return recording_embed

    monkeypatch.setattr(evaluate, "build_embedder", recording_builder)
    results = main(["--encoder", str(base), "--triplets", str(triplets), "--bootstrap", "10"]
                   + (["--bf16"] if bf16 else []))
    assert results["bf16"] is bf16
    assert len(autocast_states) == 3  # queries, positives, negatives
    assert all(enabled is bf16 and dtype == torch.bfloat16 for enabled, dtype in autocast_states)


def test_bf16_keeps_the_similarities_in_fp32(tmp_path, monkeypatch):
    """Only the embedding runs under autocast: a positive at cosine 0.9000 beats a negative at 0.8990
    (in bf16 both round to 0.8984, a tie that the triplet test counts as wrong)."""
    from autoregembed_fast.method import evaluate

    rows = [{"query": f"q{i}", "pos": f"p{i}", "neg": f"n{i}"} for i in range(4)]
    triplets = write_jsonl(tmp_path / "triplets.jsonl", rows)

    def at_cosine(cosine: float) -> torch.Tensor:
        return torch.tensor([cosine, math.sqrt(1 - cosine**2)])

    vectors = {"q": torch.tensor([1.0, 0.0]), "p": at_cosine(0.9), "n": at_cosine(0.899)}
    monkeypatch.setattr(evaluate, "build_embedder",
                        lambda *args: lambda texts: torch.stack([vectors[t[0]] for t in texts]))
    for bf16 in ([], ["--bf16"]):
        results = main(["--encoder", "unused", "--triplets", str(triplets), "--bootstrap", "10", *bf16])
        assert results["triplet_accuracy"] == 1.0
