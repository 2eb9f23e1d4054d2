"""Frozen-decoder scoring: `score_targets` vs the eager logits path, peak memory and time.

A batch of 8 examples x (1 positive + 1 own-positive + 3 negatives) = 40 targets of 64 tokens, scored
given k = 5 memory embeddings, forward + backward into the memory, on a tiny random Llama with the
smollm2 vocabulary (V = 49,152). The eager path runs the decoder with its LM head on the same batch
(logits -> log_softmax -> gather), as the released code and a plain HF model do. Each path runs in
its own process (time of a call after warm-up; peak RSS of one more call above the RSS before it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.memory import PeakRss

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES, TARGETS_PER_EXAMPLE, TOKENS, MEMORY_SLOTS = 8, 5, 64, 5


def build(vocab: int, hidden: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_llama

    torch.manual_seed(0)
    decoder = tiny_llama(vocab_size=vocab, hidden_size=hidden, max_positions=128)
    memory = torch.randn(EXAMPLES * 2, MEMORY_SLOTS, hidden) * 0.5  # queries' and positives' memory
    targets = EXAMPLES * TARGETS_PER_EXAMPLE
    target_ids = torch.randint(0, vocab, (targets, TOKENS))
    lengths = torch.randint(TOKENS // 2, TOKENS + 1, (targets,))
    target_mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long()
    # Per example: pos | query, pos | own positive, 3 negatives | query (the query's memory shared).
    example = torch.arange(EXAMPLES).repeat_interleave(TARGETS_PER_EXAMPLE)
    uses_positive_memory = torch.tensor([0, 1, 0, 0, 0]).repeat(EXAMPLES).bool()
    memory_index = torch.where(uses_positive_memory, EXAMPLES + example, example)
    return decoder, memory, target_ids, target_mask, memory_index


def eager_scores(decoder, memory, target_ids, target_mask, memory_index):
    embeddings = decoder.get_input_embeddings()(target_ids)
    inputs = torch.cat([memory[memory_index], embeddings], dim=1)
    mask = torch.cat([torch.ones(len(target_ids), MEMORY_SLOTS, dtype=torch.long), target_mask], 1)
    logits = decoder(inputs_embeds=inputs, attention_mask=mask).logits
    scoring = logits[:, MEMORY_SLOTS - 1 : MEMORY_SLOTS - 1 + TOKENS].float()
    logp = torch.log_softmax(scoring, dim=-1).gather(2, target_ids[..., None])[..., 0]
    return (logp * target_mask).sum(dim=1)


def fused_scores(decoder, memory, target_ids, target_mask, memory_index):
    from autoregembed_fast import score_targets

    return score_targets(decoder, memory, target_ids, target_mask, memory_index)


PATHS = {"eager-logits": eager_scores, "score_targets": fused_scores}


def worker(path: str, vocab: int, hidden: int) -> dict:
    decoder, memory, target_ids, target_mask, memory_index = build(vocab, hidden)
    memory.requires_grad_()

    def scores_and_backward():
        memory.grad = None
        scores = PATHS[path](decoder, memory, target_ids, target_mask, memory_index)
        scores.sum().backward()
        return scores

    scores_and_backward()  # warm-up
    start = time.perf_counter()
    scores_and_backward()
    seconds = time.perf_counter() - start
    with PeakRss() as peak:  # after the timing: PeakRss slows allocation down
        scores = scores_and_backward()
    return {"seconds": seconds, "peak_extra_bytes": peak.extra_bytes, "scores": scores.tolist(),
            "memory_grad_norm": memory.grad.norm().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.hidden)))
        return {}
    results = {}
    for path in PATHS:
        done = subprocess.run(
            [sys.executable, "-m", "bench.method.scoring", "--worker", path, "--vocab", str(args.vocab),
             "--hidden", str(args.hidden)],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            raise RuntimeError(f"{path} failed:\n{done.stderr[-2000:]}")
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    difference = max(abs(a - b) for a, b in zip(results["eager-logits"]["scores"],
                                                 results["score_targets"]["scores"]))
    print(f"scoring {EXAMPLES * TARGETS_PER_EXAMPLE} targets x {TOKENS} tokens, k={MEMORY_SLOTS}, "
          f"tiny Llama d={args.hidden} V={args.vocab}, forward + backward into the memory")
    print("| path | time (s) | peak extra (MB) |\n|---|---|---|")
    for path, result in results.items():
        print(f"| {path} | {result['seconds']:.3f} | {result['peak_extra_bytes'] / 2**20:.0f} |")
    print(f"max |score difference| = {difference:.2e}")
    return results


if __name__ == "__main__":
    main()
