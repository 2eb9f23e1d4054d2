"""Evaluation of text embeddings: triplet accuracy and Spearman correlation.

    python -m autoregembed_fast.evaluate --encoder DIR_OR_BASE --triplets FILE [--pairs FILE]
        [--pooling memory|last-token]

`memory` pooling is AutoRegEmbed's (mean of the k memory embeddings; a base model gets freshly added
compress tokens, the untrained baseline); `last-token` takes the base model's last hidden state of the
prompt "{text}\\nThis sentence means in one word: “" (the untrained prompt baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from autoregembed_fast.data import (
    EVAL_PROMPT,
    PAIR_FIELDS,
    TRIPLET_FIELDS,
    negatives_of,
    prompted_batch,
    read_jsonl,
)


def triplet_accuracy(embed, rows) -> float:
    """Fraction of rows whose positive is closer (cosine) to the query than every negative."""
    queries = embed([row["query"] for row in rows])
    positives = embed([row["pos"] for row in rows])
    negatives = [negatives_of(row) for row in rows]
    negative_embeddings = embed([neg for negs in negatives for neg in negs])
    correct, offset = 0, 0
    for i, negs in enumerate(negatives):
        positive_score = queries[i] @ positives[i]
        negative_scores = negative_embeddings[offset : offset + len(negs)] @ queries[i]
        offset += len(negs)
        correct += int(bool((positive_score > negative_scores).all()))
    return correct / len(rows)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties sharing their average rank (as in Spearman's rho)."""
    order = torch.argsort(values)
    sorted_values = values[order]
    ranks = torch.empty(len(values), dtype=torch.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def pair_spearman(embed, rows) -> float:
    """Spearman correlation between cos(text1, text2) and the gold scores."""
    first = embed([row["text1"] for row in rows])
    second = embed([row["text2"] for row in rows])
    similarity = (first * second).sum(dim=1)
    return spearman(similarity, torch.tensor([float(row["score"]) for row in rows]))


def last_token_embedder(model, tokenizer, prompt: str = EVAL_PROMPT, batch_size: int = 32):
    """Embeds texts by the base model's last hidden state at the prompt's last token."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def embed(texts):
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids, mask = prompted_batch(tokenizer, texts[start : start + batch_size], prompt)
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            last = mask.sum(dim=1) - 1
            states = hidden.last_hidden_state[torch.arange(len(ids)), last.to(device)]
            chunks.append(F.normalize(states.float(), dim=-1))
        return torch.cat(chunks)

    return embed


def build_embedder(encoder: str, pooling: str, k: int, batch_size: int):
    from autoregembed_fast.model import CONFIG_FILE, AutoRegEmbed, load_causal_lm, load_encoder

    if pooling == "memory":
        model = load_encoder(encoder, k).eval()
        return lambda texts: model.encode(texts, batch_size=batch_size)
    if Path(encoder, CONFIG_FILE).is_file():
        saved = AutoRegEmbed.from_pretrained(encoder)
        base, tokenizer = saved.encoder, saved.tokenizer
    else:
        base, tokenizer = load_causal_lm(encoder)
    return last_token_embedder(base.eval(), tokenizer, batch_size=batch_size)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m autoregembed_fast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True,
                        help='AutoRegEmbed directory, base model directory or "smollm2"')
    parser.add_argument("--triplets", help="JSONL of {query, pos, neg}")
    parser.add_argument("--pairs", help="JSONL of {text1, text2, score}")
    parser.add_argument("--pooling", choices=("memory", "last-token"), default="memory")
    parser.add_argument("--k", type=int, default=5, help="compress tokens added to a base model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not (args.triplets or args.pairs):
        parser.error("give --triplets and/or --pairs")
    triplets = read_jsonl(args.triplets, TRIPLET_FIELDS) if args.triplets else None
    pairs = read_jsonl(args.pairs, PAIR_FIELDS) if args.pairs else None
    torch.manual_seed(0)  # freshly added compress tokens are initialised at random
    embed = build_embedder(args.encoder, args.pooling, args.k, args.batch_size)
    results = {"encoder": args.encoder, "pooling": args.pooling}
    if triplets:
        results["triplet_accuracy"] = triplet_accuracy(embed, triplets)
        results["triplets"] = len(triplets)
    if pairs:
        results["spearman"] = pair_spearman(embed, pairs)
        results["pairs"] = len(pairs)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
