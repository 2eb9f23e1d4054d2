"""Stage-2 study: named settings x seeds from one stage-1 model, each trained with `train align` and
measured on held-out data, every run appended to STUDY/results.jsonl.

    python -m bench.method.stage2_study prepare --study STUDY --stage1 DIR/model --base BASE \\
        --data STAGE2.jsonl --heldout HELDOUT.jsonl
    python -m bench.method.stage2_study run --study STUDY --setting NAME --seed S
    python -m bench.method.stage2_study table --study STUDY

`prepare` computes the stage-1 model's reference scores (summed and per-token averaged) of the
training and held-out rows, and the stage-1 embeddings and metrics every run is compared with.
`run` trains one setting (`SETTINGS`, the flags it adds to `train align`) with one seed and records:
held-out triplet accuracy and STS-B dev Spearman x 100 with 95 % bootstrap intervals (memory
pooling, as `evaluate`), how far the embedding moved (cosine of each evaluation text's embedding
after vs before stage 2), the stage-2 loss on the held-out triplets before and after (the setting's
own loss), and the training log's loss and saturation by tenths of the run. `table` prints one
Markdown row per setting: the mean over seeds and each seed's value.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from autoregembed_fast.backends import cpu_native_bf16
from autoregembed_fast.method import evaluate
from autoregembed_fast.method.data import (
    ALIGNMENT_FIELDS,
    Tokenization,
    read_alignment_rows,
    read_jsonl,
    read_sts_b,
    sts_b_path,
)
from autoregembed_fast.method.losses import AlignmentLoss
from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm, load_encoder
from autoregembed_fast.method.training import commands as train
from autoregembed_fast.method.training.objectives import AlignmentObjective
from autoregembed_fast.method.training.references import References

AVERAGED = ["--average-logprobs", "--beta", "1.0"]  # per-token averages, beta 1 (the demo until 12-07)
SUMMED = ["--beta", "0.1"]  # the released form: summed log-probs, beta 0.1 (the demo since)
ONE_EPOCH = ["--epochs", "1"]  # 600 rows / batch 8 = 75 steps
# The demo's stage 2 since the seventh session: in-batch negatives, 2e-5, the released schedule.
IN_BATCH_WARMUP_DECAY = ["--lr", "2e-5", "--in-batch-negatives", "--lr-schedule", "warmup-decay"]
# name -> flags added to `train align` (batch 8, warm-up 5 %, cosine, clip 1.0 unless a flag says).
SETTINGS = {
    "demo": AVERAGED + ["--steps", "60", "--lr", "5e-6"],
    "averaged-1ep-2e-5": AVERAGED + ONE_EPOCH + ["--lr", "2e-5"],
    "summed-1ep-2e-5": SUMMED + ONE_EPOCH + ["--lr", "2e-5"],
    "averaged-1ep-2e-5-in-batch": AVERAGED + ONE_EPOCH + ["--lr", "2e-5", "--in-batch-negatives"],
    "summed-1ep-2e-5-in-batch": SUMMED + ONE_EPOCH + ["--lr", "2e-5", "--in-batch-negatives"],
    "summed-2ep-2e-5-in-batch": SUMMED + ["--epochs", "2", "--lr", "2e-5", "--in-batch-negatives"],
    "summed-1ep-2e-5-in-batch-no-reference": SUMMED + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives", "--reference-scores", "none"],
    "summed-beta0.05-1ep-2e-5-in-batch": ["--beta", "0.05"] + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives"],
    "summed-1ep-5e-5-in-batch": SUMMED + ONE_EPOCH + ["--lr", "5e-5", "--in-batch-negatives"],
    "summed-1ep-2e-5-in-batch-warmup-decay": SUMMED + ONE_EPOCH + IN_BATCH_WARMUP_DECAY,
    "summed-4ep-2e-5-in-batch-warmup-decay": SUMMED + ["--epochs", "4"] + IN_BATCH_WARMUP_DECAY,
    # The two other pairings of the loss form and beta (sums saturate at beta 1; averages barely
    # move the sigmoids at beta 0.1).
    "summed-beta1-1ep-2e-5-in-batch-warmup-decay": ["--beta", "1.0"] + ONE_EPOCH + IN_BATCH_WARMUP_DECAY,
    "averaged-beta0.1-1ep-2e-5-in-batch-warmup-decay": ["--average-logprobs", "--beta", "0.1"]
    + ONE_EPOCH + IN_BATCH_WARMUP_DECAY,
    # The alignment term's weight (`--alignment-weight`; released 1): 0 leaves the uniformity term
    # alone, 2 doubles the alignment term's gradient.
    **{f"summed-1ep-2e-5-in-batch-warmup-decay-alignment{weight}": SUMMED + ONE_EPOCH
       + IN_BATCH_WARMUP_DECAY + ["--alignment-weight", weight] for weight in ("0", "1.5", "2", "3", "4")},
    "summed-1ep-2e-5-in-batch-warmup-decay-accum4": SUMMED + ONE_EPOCH + IN_BATCH_WARMUP_DECAY + [
        "--grad-accum", "4"],  # global batch 32, 18 steps
    "summed-1ep-2e-5-in-batch16": SUMMED + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives", "--batch-size", "16"],  # 37 steps (592 rows)
    "summed-1ep-2e-5-in-batch-hard": SUMMED + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives", "--in-batch-hard-negatives"],
    "summed-1ep-2e-5-in-batch-accum4": SUMMED + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives", "--grad-accum", "4"],  # global batch 32, 18 steps
    "averaged-1ep-5e-5-in-batch": AVERAGED + ONE_EPOCH + ["--lr", "5e-5", "--in-batch-negatives"],
    "averaged-1ep-2e-5-in-batch-detached": AVERAGED + ONE_EPOCH + [
        "--lr", "2e-5", "--in-batch-negatives", "--detach-self-score"],
}
EVALUATION_BATCH = 32
BOOTSTRAP = 1000


def flag_value(flags: list[str], name: str, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


def reference_file(study: Path, part: str, averaged: bool) -> Path:
    return study / f"reference-{part}-{'averaged' if averaged else 'summed'}.pt"


def evaluation_texts(heldout, sts_b) -> list[str]:
    texts = {t for row in heldout for t in (row["query"], row["pos"], row["neg"])}
    texts |= {t for row in sts_b for t in (row["text1"], row["text2"])}
    return sorted(texts)


def embeddings_of(model_dir: str, texts: list[str]) -> torch.Tensor:
    """[len(texts), d] L2-normalised memory-mean embeddings (the evaluation's pooling)."""
    torch.manual_seed(0)
    model = load_encoder(model_dir).eval()
    return model.encode(texts, batch_size=EVALUATION_BATCH)


def metrics_of(embeddings: torch.Tensor, texts: list[str], heldout, sts_b) -> dict:
    row_of = {text: i for i, text in enumerate(texts)}

    def embed(batch):
        return embeddings[[row_of[t] for t in batch]]

    return {**evaluate.triplet_metrics(embed, heldout, BOOTSTRAP),
            **evaluate.spearman_metrics(embed, sts_b, BOOTSTRAP, "sts_b_spearman")}


def prepare(args) -> None:
    study = Path(args.study)
    study.mkdir(parents=True, exist_ok=True)
    for part, data in (("train", args.data), ("heldout", args.heldout)):
        for averaged in (True, False):
            train.main(["reference", "--encoder", args.stage1, "--decoder", args.base, "--data", data,
                        "--output", str(reference_file(study, part, averaged)), "--batch-size", "32",
                        *(["--average-logprobs"] if averaged else [])])
    heldout = read_jsonl(args.heldout, ALIGNMENT_FIELDS)
    sts_b = read_sts_b(sts_b_path("dev"))
    texts = evaluation_texts(heldout, sts_b)
    embeddings = embeddings_of(args.stage1, texts)
    torch.save({"texts": texts, "embeddings": embeddings}, study / "stage1-embeddings.pt")
    paths = {"stage1": args.stage1, "base": args.base, "data": args.data, "heldout": args.heldout}
    (study / "study.json").write_text(json.dumps(
        {**paths, "stage1_metrics": metrics_of(embeddings, texts, heldout, sts_b)}, indent=2))


@torch.no_grad()
def heldout_loss(model_dir: str, study: dict, flags: list[str], references: References) -> dict:
    """The setting's stage-2 loss on the held-out triplets (batches of 8) and what the loss saw."""
    model = load_encoder(model_dir).eval()
    decoder = frozen_decoder(load_causal_lm(study["base"])[0])
    loss = AlignmentLoss(float(flag_value(flags, "--beta", 0.1)), 0.1, 1,
                         float(flag_value(flags, "--alignment-weight", 1.0)))
    objective = AlignmentObjective(decoder, model.tokenizer, Tokenization(), loss, references,
                                   "--average-logprobs" in flags, decoder_bos_id=model.decoder_bos_id,
                                   in_batch_negatives="--in-batch-negatives" in flags,
                                   in_batch_hard_negatives="--in-batch-hard-negatives" in flags)
    total, count = 0.0, 0
    for start in range(0, len(references.rows), 8):
        rows = list(range(start, min(start + 8, len(references.rows))))
        value, n = objective(model, rows, torch.device("cpu"))
        total, count = total + float(value), count + n
    return {"loss": total / count, **objective.diagnostics()}


def heldout_loss_before(study_dir: Path, setting: str, study: dict, flags, references) -> dict:
    """`heldout_loss` of the stage-1 model under a setting's loss: the same for every seed, so
    computed once per setting and kept in STUDY/heldout-before-SETTING.json."""
    cache = study_dir / f"heldout-before-{setting}.json"
    if not cache.is_file():
        cache.write_text(json.dumps(heldout_loss(study["stage1"], study, flags, references)))
    return json.loads(cache.read_text())


def by_tenths(records: list[dict], key: str) -> list[float]:
    values = [r[key] for r in records if key in r]
    tenth = max(1, len(values) // 10)
    return [round(sum(values[i : i + tenth]) / len(values[i : i + tenth]), 4)
            for i in range(0, len(values), tenth)]


def run(args) -> None:
    study_dir = Path(args.study)
    study = json.loads((study_dir / "study.json").read_text())
    flags = SETTINGS[args.setting]
    averaged = "--average-logprobs" in flags
    output = study_dir / "runs" / args.setting / f"seed{args.seed}"
    references = flag_value(flags, "--reference-scores") or str(reference_file(study_dir, "train", averaged))
    extra = [f for i, f in enumerate(flags)
             if f != "--reference-scores" and (i == 0 or flags[i - 1] != "--reference-scores")]
    command = ["align", "--encoder", study["stage1"], "--decoder", study["base"], "--data", study["data"],
               "--reference-scores", references, "--reference-model", study["stage1"],
               "--output", str(output), "--seed", str(args.seed), "--batch-size", "8",
               "--lr-schedule", "cosine", *(["--bf16"] if cpu_native_bf16() else []), *extra]
    started = time.perf_counter()
    train.main(command)
    wall = time.perf_counter() - started
    model_dir = str(output / "model")

    saved = torch.load(study_dir / "stage1-embeddings.pt")
    texts = saved["texts"]
    heldout = read_jsonl(study["heldout"], ALIGNMENT_FIELDS)
    sts_b = read_sts_b(sts_b_path("dev"))
    embeddings = embeddings_of(model_dir, texts)
    cosine = (embeddings * saved["embeddings"]).sum(dim=1)

    heldout_rows = read_alignment_rows(study["heldout"])
    cache = torch.load(reference_file(study_dir, "heldout", averaged))
    if flag_value(flags, "--reference-scores") == "none":
        cache = {"positive": torch.zeros_like(cache["positive"]),
                 "negative": torch.zeros_like(cache["negative"])}
    references = References(heldout_rows, cache["positive"], cache["negative"])
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if line]
    record = {
        "setting": args.setting, "seed": args.seed, "flags": flags, "command": command,
        "steps": len(log), "train_wall_s": round(wall, 1),
        **metrics_of(embeddings, texts, heldout, sts_b),
        "cosine_to_stage1": {"mean": float(cosine.mean()), "p05": float(cosine.quantile(0.05)),
                             "min": float(cosine.min())},
        "heldout_before": heldout_loss_before(study_dir, args.setting, study, flags, references),
        "heldout_after": heldout_loss(model_dir, study, flags, references),
        "train_loss_by_tenths": by_tenths(log, "loss"),
        "s1_saturated_by_tenths": by_tenths(log, "s1_saturated"),
        "s2_saturated_by_tenths": by_tenths(log, "s2_saturated"),
        "margin_std_by_tenths": by_tenths(log, "margin_std"),
        "max_grad_norm": max(r["grad_norm"] for r in log),
    }
    with (study_dir / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def table(args) -> None:
    study_dir = Path(args.study)
    study = json.loads((study_dir / "study.json").read_text())
    records = [json.loads(line) for line in (study_dir / "results.jsonl").read_text().splitlines() if line]
    first = study["stage1_metrics"]
    low, high = first["triplet_accuracy_ci95"]
    sts_low, sts_high = first["sts_b_spearman_ci95"]
    print(f"stage 1: triplets {first['triplet_accuracy']:.3f} [{low:.3f}, {high:.3f}], "
          f"STS-B dev {first['sts_b_spearman']:.1f} [{sts_low:.1f}, {sts_high:.1f}]\n")
    print("| setting | seeds | triplets mean (per seed) | STS-B dev mean (per seed) | cos to stage 1 | "
          "held-out loss before → after | held-out pos > neg after | s1 / s2 saturated (last tenth) "
          "| train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        runs = sorted((r for r in records if r["setting"] == setting), key=lambda r: r["seed"])
        if not runs:
            continue

        def mean(values):
            return sum(values) / len(values)

        triplets = [r["triplet_accuracy"] for r in runs]
        sts = [r["sts_b_spearman"] for r in runs]
        print(f"| {setting} | {len(runs)} | {mean(triplets):.3f} ({' / '.join(f'{v:.3f}' for v in triplets)}) "
              f"| {mean(sts):.1f} ({' / '.join(f'{v:.1f}' for v in sts)}) "
              f"| {mean([r['cosine_to_stage1']['mean'] for r in runs]):.4f} "
              f"| {mean([r['heldout_before']['loss'] for r in runs]):.3f} → "
              f"{mean([r['heldout_after']['loss'] for r in runs]):.3f} "
              f"| {mean([r['heldout_after']['pos_over_neg'] for r in runs]):.3f} "
              f"| {mean([r['s1_saturated_by_tenths'][-1] for r in runs]):.2f} / "
              f"{mean([r['s2_saturated_by_tenths'][-1] for r in runs]):.2f} "
              f"| {mean([r['train_wall_s'] for r in runs]):.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.method.stage2_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("prepare")
    first.add_argument("--study", required=True)
    first.add_argument("--stage1", required=True, help="the stage-1 AutoRegEmbed directory")
    first.add_argument("--base", required=True, help="the base model directory (the decoder)")
    first.add_argument("--data", required=True, help="stage-2 training rows (JSONL)")
    first.add_argument("--heldout", required=True, help="held-out triplets (JSONL)")
    one = commands.add_parser("run")
    one.add_argument("--study", required=True)
    one.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    one.add_argument("--seed", type=int, required=True)
    summary = commands.add_parser("table")
    summary.add_argument("--study", required=True)
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
