"""The training loop: global batches over ranks and accumulation micro-batches (DDP, or FSDP2 with
`--fsdp`), AdamW on fp32 master weights, the learning-rate schedule, the JSONL log and loss curve,
checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from autoregembed_fast.method.training.cluster import Cluster, epoch_batches
from autoregembed_fast.method.lora import merge_lora
from autoregembed_fast.method.model import AutoRegEmbed
from autoregembed_fast.method.training.parallel import Parallelism

LOG = "log.jsonl"
# The learning-rate schedules (`lr_factor`); the first is the released runs' and the commands' default.
SCHEDULES = ("warmup-decay", "cosine", "constant")


@dataclass(frozen=True)
class TrainingConfig:
    """What a training run is asked to do (the commands build it from their flags: `from_args`)."""

    output: Path  # the model, log, loss curve and checkpoints go here
    name: str  # the run's title in the progress bar and on the loss curve
    batch_size: int = 8  # rows per rank per micro-batch
    grad_accum: int = 1
    steps: int = 0  # optimizer steps; 0: `epochs` epochs
    epochs: int = 1
    seed: int = 0  # the data order (and the caller's RNG)
    lr: float = 1e-5
    compress_token_lr: float | None = None  # None: `lr`
    weight_decay: float = 0.0
    lr_schedule: str = SCHEDULES[0]
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    bf16: bool = False  # autocast over the fp32 master weights
    fsdp: bool = False
    merge_lora: bool = False  # fold LoRA adapters into the saved model
    save_every: int = 0
    resume: bool = False
    stop_after: int = 0

    @classmethod
    def from_args(cls, args) -> "TrainingConfig":
        return cls(
            output=Path(args.output), name=args.command, batch_size=args.batch_size,
            grad_accum=args.grad_accum, steps=args.steps, epochs=args.epochs, seed=args.seed,
            lr=args.lr, compress_token_lr=args.compress_token_lr, weight_decay=args.weight_decay,
            lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio,
            max_grad_norm=args.max_grad_norm, bf16=args.bf16, fsdp=args.fsdp,
            merge_lora=bool(args.lora), save_every=args.save_every, resume=args.resume,
            stop_after=args.stop_after)


def lr_factor(schedule: str, total_steps: int, warmup_steps: int):
    """The learning-rate multiplier of optimizer step `step` (0-based).

    "warmup-decay" is DeepSpeed's WarmupDecayLR as the released runs get it: their DeepSpeed config
    names it, and a config's scheduler replaces the `--lr_scheduler_type cosine` of their command
    lines. A log-shaped warm-up, log(t + 1) / log(w) over w = max(2, warmup_steps) scheduler steps,
    then a linear decay, (total - t) / (total - w). DeepSpeed starts at its minimum rate (0, as
    transformers fills it) and steps the schedule after each optimizer step, so optimizer step s
    runs at its value for t = s - 1: steps 0 and 1 run at rate 0.
    "cosine": a linear warm-up, then a cosine decay to 0 (what the released command lines name);
    "constant": the same warm-up, then the full rate."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; one of {SCHEDULES}")

    def warmup_decay(step: int) -> float:
        t = step - 1  # DeepSpeed's scheduler steps so far, less one
        if t < 0:
            return 0.0
        warmup = max(2, warmup_steps)
        if t < warmup:
            return math.log(t + 1) / math.log(warmup)
        return max(0.0, (total_steps - t) / max(1, total_steps - warmup))

    def factor(step: int) -> float:
        if schedule == "warmup-decay":
            return warmup_decay(step)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def parameter_groups(model: AutoRegEmbed, trainable, compress_token_lr: float | None):
    """AdamW's groups: everything at --lr, or with `compress_token_lr` the compress-token
    embeddings in a group of their own at that rate (the schedule scales both alike)."""
    if compress_token_lr is None:
        return [{"params": trainable}]
    compress = model.compress_embeddings
    return [{"params": [p for p in trainable if p is not compress]},
            {"params": [compress], "lr": compress_token_lr}]


def run_training(config: TrainingConfig, cluster: Cluster, model: AutoRegEmbed, objective,
                 n_rows: int) -> None:
    output = config.output
    first_epoch = epoch_batches(n_rows, config.batch_size, config.seed, 0, cluster)
    steps_per_epoch = len(first_epoch) // config.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{n_rows} rows make no step of batch {config.batch_size} x "
                         f"{cluster.world} ranks x {config.grad_accum} accumulation")
    total_steps = config.steps or steps_per_epoch * config.epochs
    parallelism = Parallelism(cluster, config.fsdp)
    # Master weights in fp32 whatever the checkpoint's dtype (transformers loads a bf16 checkpoint
    # as bf16): an AdamW update below bf16's spacing (most of them at lr 5e-6) would otherwise
    # vanish. `--bf16` runs the compute under autocast over these fp32 weights.
    model.to(device=cluster.device, dtype=torch.float32).train()
    parallelism.shard(model, config.bf16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW (CPU and CUDA) is one kernel over all parameters; the default per-tensor loop
    # took 0.2-1.2 s of a ~5 s CPU step for SmolLM2-135M, the fused one 0.07-0.09 s (NOTES.md).
    optimizer = torch.optim.AdamW(parameter_groups(model, trainable, config.compress_token_lr),
                                  lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_factor(config.lr_schedule, total_steps, math.ceil(config.warmup_ratio * total_steps)))
    step = 0
    if config.resume:
        step = resume(parallelism, cluster, output, model, optimizer, scheduler)
    wrapped = parallelism.wrap(model)

    progress = None
    if cluster.main:
        output.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc=config.name, dynamic_ncols=True)
    autocast = (torch.autocast(cluster.device.type, dtype=torch.bfloat16) if config.bf16
                else contextlib.nullcontext())
    log_mode = "a" if step > 0 else "w"
    log = (output / LOG).open(log_mode) if cluster.main else None
    started = time.perf_counter()
    batches_epoch, batches = None, []
    while step < total_steps:
        epoch, position = divmod(step * config.grad_accum, steps_per_epoch * config.grad_accum)
        if epoch != batches_epoch:  # the permutation of an epoch is drawn once, not every step
            batches_epoch = epoch
            batches = epoch_batches(n_rows, config.batch_size, config.seed, epoch, cluster)
        micro_batches = batches[position : position + config.grad_accum]
        global_count = cluster.all_sum(sum(objective.count(rows) for rows in micro_batches))
        step_started = time.perf_counter()
        loss_sum = 0.0
        optimizer.zero_grad(set_to_none=True)
        for i, rows in enumerate(micro_batches):
            with parallelism.gradient_sync(model, wrapped, last=i == len(micro_batches) - 1):
                with autocast:
                    batch_loss, _ = objective(wrapped, rows, cluster.device)
                # DDP and FSDP2 average gradients over ranks: scale so that the result is the
                # global mean.
                (batch_loss * cluster.world / global_count).backward()
            loss_sum += batch_loss.item()
        grad_norm = parallelism.clip_grad_norm(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        loss = cluster.all_sum(loss_sum) / global_count
        if not math.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss} at step {step}")
        # What the stage-2 loss saw in this rank's micro-batches (margins, saturation), taken on
        # every rank so that none accumulates it; rank 0 logs its own.
        seen = getattr(objective, "diagnostics", dict)()
        if cluster.main:
            examples = config.batch_size * cluster.world * len(micro_batches)
            throughput = examples / (time.perf_counter() - step_started)
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "examples_per_s": throughput,
                      "elapsed_s": time.perf_counter() - started}
            record.update(seen)
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{throughput:.1f}")
            progress.update(1)
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            parallelism.save_checkpoint(output, model, optimizer, scheduler, step)
        if config.stop_after and step >= config.stop_after:
            break
    finished = step >= total_steps
    full_state = parallelism.full_state(model) if finished else None
    if cluster.main:
        progress.close()
        log.close()
        if finished:
            if config.merge_lora:
                merge_lora(model)
            model.save_pretrained(output / "model", state_dict=full_state)
            plot_losses(output / LOG, output / "loss.png", config.name)
            print(f"saved {output / 'model'}; log {output / LOG}; curve {output / 'loss.png'}")
    if cluster.world > 1:
        dist.barrier()


def resume(parallelism: Parallelism, cluster, output, model, optimizer, scheduler) -> int:
    """Restores the last checkpoint of `output` (if any) and returns its step; the log's records of
    later steps are dropped (they are redone)."""
    directory, step = parallelism.resume(output, model, optimizer, scheduler)
    if cluster.main and directory is None:
        print(f"--resume: no checkpoint in {output} yet, starting from step 0")
    elif cluster.main:
        print(f"resumed from {directory} at step {step}")
        records = (output / LOG).read_text().splitlines() if (output / LOG).is_file() else []
        kept = [line for line in records if line.strip() and json.loads(line)["step"] <= step]
        (output / LOG).write_text("".join(line + "\n" for line in kept))
    return step


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
