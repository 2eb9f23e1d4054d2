"""How the trainable encoder is spread over the ranks, decided in one place: one process, DDP (every
rank holds the whole encoder, gradients averaged) or FSDP2 (`--fsdp`: parameters, gradients and
optimizer state sharded, `sharding`). The training loop asks this object, never the flags."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from autoregembed_fast.method.training.checkpoint import (
    load_checkpoint,
    load_sharded_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    sharded_checkpoint_of,
)
from autoregembed_fast.method.training.cluster import Cluster
from autoregembed_fast.method.training.sharding import full_model_state, shard_encoder


class Parallelism:
    """`kind` is "none" (one process), "ddp" or "fsdp". `prepare` shards the model (FSDP2) or wraps
    it (DDP) and returns what the objectives call; the rest answers the loop's questions."""

    def __init__(self, cluster: Cluster, fsdp: bool):
        if fsdp and not dist.is_initialized():
            raise SystemExit("--fsdp shards the encoder over the ranks of torchrun: run with "
                             "`torchrun --nproc_per_node N -m autoregembed_fast.train ...`, N >= 2")
        self.cluster = cluster
        self.kind = "fsdp" if fsdp else "ddp" if cluster.world > 1 else "none"

    def shard(self, model, bf16: bool) -> None:
        """FSDP2 shards the model in place before the optimizer sees its parameters."""
        if self.kind == "fsdp":
            shard_encoder(model, bf16=bf16)

    def wrap(self, model):
        """The module the objectives call: DDP's wrapper, or the (sharded) model itself."""
        return torch.nn.parallel.DistributedDataParallel(model) if self.kind == "ddp" else model

    def gradient_sync(self, model, wrapped, last: bool):
        """Gradients are reduced over ranks on the last micro-batch of a step only."""
        if self.kind == "fsdp":
            model.set_requires_gradient_sync(last)
        if self.kind == "ddp" and not last:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if self.kind == "fsdp" else norm)  # FSDP2: a DTensor

    def save_checkpoint(self, output: Path, model, optimizer, scheduler, step: int) -> None:
        if self.kind == "fsdp":
            save_sharded_checkpoint(self.cluster, output, model, optimizer, scheduler, step)
        else:
            save_checkpoint(self.cluster, output, model, optimizer, scheduler, step)

    def resume(self, output: Path, model, optimizer, scheduler) -> tuple[Path | None, int]:
        """(the checkpoint resumed from or None, its step)."""
        if self.kind == "fsdp":
            directory = sharded_checkpoint_of(output)
            load = load_sharded_checkpoint
        else:
            directory = resumable_checkpoint(output)
            load = load_checkpoint
        return directory, 0 if directory is None else load(directory, model, optimizer, scheduler)

    def full_state(self, model) -> dict | None:
        """The model's full state for saving (FSDP2 gathers it to rank 0: every rank must call);
        None where the live parameters are whole."""
        return full_model_state(model) if self.kind == "fsdp" else None
