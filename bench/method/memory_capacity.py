"""What the frozen decoder can read from k memory vectors: the yardstick for stage 1.

    python -m bench.method.memory_capacity [--model smollm2|DIR] [--texts FILE] [--limit 16] [--k 5]
        [--steps 100] [--lr 1e-2] [--encoder DIR ...] [--json FILE]

Optimises k input vectors per text directly against the frozen decoder (no encoder: AdamW on the
vectors, started at random rows of the input embeddings, so at the scale the decoder reads), to
regenerate the text, then prints the reconstruction NLL (nats per token) from each text's own
vectors, from another text's and from none (the decoder alone), with 95 % bootstrap intervals.
`--bos-before-memory` puts the decoder's bos before the vectors. Each `--encoder` (a trained
AutoRegEmbed directory, read with its own layout) gets the same three numbers on the same texts:
the gap between its "own" and the optimised vectors' "own" is what the encoder has yet to learn.

TEXTS: JSONL of stage-1 rows {context, instruction, output} (the encoder reads context, the decoder
regenerates output), or of triplets {query, pos, neg} whose sorted unique sentences become
autoencoding rows (the demo's stage-1 data); default: the triplets shipped in examples/data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from autoregembed_fast.method.data import (
    COMPRESSION_FIELDS,
    TRIPLET_FIELDS,
    Tokenization,
    compression_batch,
    compression_rows,
    read_jsonl,
)
from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm
from autoregembed_fast.method.model import AutoRegEmbed
from autoregembed_fast.method.scoring import memory_for_decoder, score_targets
from autoregembed_fast.method.reconstruction import per_text_nll, reconstruction_nlls, summarise

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXTS = ROOT / "examples" / "data" / "medi_nli_train.jsonl"


def read_texts(path, limit: int) -> list[dict]:
    """The first `limit` stage-1 rows of a file (see the module's docstring for the two formats),
    told apart by the first row's fields; every row is validated."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no rows")
    first = json.loads(lines[0])
    if isinstance(first, dict) and {"query", "pos"} <= set(first):
        rows = compression_rows(read_jsonl(path, TRIPLET_FIELDS))
    else:
        rows = read_jsonl(path, COMPRESSION_FIELDS)
    if limit < 2 or len(rows) < 2:
        raise SystemExit(f"need at least 2 texts (the 'other' memory is another text's); "
                         f"--limit {limit}, {len(rows)} in {path}")
    return rows[:limit]


def optimise_memory(decoder, tokenizer, rows, k: int, steps: int, lr: float, batch_size: int = 16,
                    seed: int = 0, bos_id: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """k vectors per row [n, k, d], optimised so that the frozen decoder regenerates each row's
    output from its own vectors (mean token NLL over all rows per step), read after the embedding
    of `bos_id` when given; and the loss per step."""
    embeddings = decoder.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, embeddings.shape[0], (len(rows), k), generator=generator)
    memory = embeddings[start].float().clone().requires_grad_(True)
    # betas (0.9, 0.9): the vectors move fast at first; a long second-moment memory slows that.
    optimizer = torch.optim.AdamW([memory], lr=lr, betas=(0.9, 0.9), weight_decay=0.0)
    batches = [compression_batch(tokenizer, rows[i : i + batch_size], Tokenization())
               for i in range(0, len(rows), batch_size)]
    tokens = sum(int(b["target_mask"].sum()) for b in batches)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for first, batch in zip(range(0, len(rows), batch_size), batches):
            index = torch.arange(first, first + batch["target_ids"].shape[0])
            scores = score_targets(decoder, memory_for_decoder(decoder, memory, bos_id),
                                   batch["target_ids"], batch["target_mask"], index)
            loss = -scores.sum() / tokens
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    return memory.detach(), losses


def format_row(name: str, result: dict) -> str:
    def cell(key):
        low, high = result[f"{key}_ci95"]
        return f"{result[key]:.3f} [{low:.3f}, {high:.3f}]"

    return (f"| {name} | {cell('own')} | {cell('other')} | {cell('none')} | "
            f"{cell('other_minus_own')} | {cell('none_minus_own')} |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.method.memory_capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help='the frozen decoder: "smollm2" or a directory')
    parser.add_argument("--texts", default=str(DEFAULT_TEXTS))
    parser.add_argument("--limit", type=int, default=16, help="texts (the first of the file)")
    parser.add_argument("--k", type=int, default=5, help="memory vectors per text")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--bos-before-memory", action="store_true",
                        help="the decoder reads [bos ; vectors ; text] (default: [vectors ; text])")
    parser.add_argument("--encoder", action="append", default=[],
                        help="a trained AutoRegEmbed directory to compare (repeatable)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.k < 1 or args.steps < 0 or not args.lr > 0:
        parser.error("--k must be >= 1, --steps >= 0 and --lr > 0")
    rows = read_texts(args.texts, args.limit)
    decoder, tokenizer = load_causal_lm(args.model)
    decoder = frozen_decoder(decoder)

    started = time.perf_counter()
    bos_id = tokenizer.bos_token_id if args.bos_before_memory else None
    memory, losses = optimise_memory(decoder, tokenizer, rows, args.k, args.steps, args.lr,
                                     bos_id=bos_id)
    results = {"settings": vars(args), "texts": len(rows),
               "optimised": summarise(*per_text_nll(decoder, tokenizer, memory, rows, bos_id=bos_id),
                                      args.bootstrap),
               "optimised_loss_by_step": losses, "optimise_s": time.perf_counter() - started,
               "encoders": {}}
    for directory in args.encoder:
        model = AutoRegEmbed.from_pretrained(directory).eval()
        results["encoders"][directory] = reconstruction_nlls(model, decoder, rows,
                                                             samples=args.bootstrap)

    print(f"{len(rows)} texts, k = {args.k}; optimised vectors: {args.steps} steps of AdamW "
          f"lr {args.lr} in {results['optimise_s']:.0f} s. NLL nats/token (95 % CI):")
    print("| memory | own | other | none | other - own | none - own |")
    print("|---|---|---|---|---|---|")
    print(format_row(f"optimised vectors ({args.steps} steps)", results["optimised"]))
    for directory, result in results["encoders"].items():
        print(format_row(f"encoder {directory}", result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
