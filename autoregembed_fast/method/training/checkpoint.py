"""Checkpoints of the training loop: atomic saves, RNG state, and the resumable state of a run (one
file from rank 0, or with FSDP2 a torch.distributed.checkpoint directory written by every rank)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from autoregembed_fast.method.training.sharding import load_sharded_state, sharded_state

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint"  # a directory, with --fsdp
LOOP_STATE = "loop.pt"  # scheduler, RNG and step, next to the shards


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


def save_checkpoint(cluster, output, model, optimizer, scheduler, step) -> None:
    """One file written by rank 0 (the whole model: one process or DDP)."""
    if cluster.main:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step},
                    output / CHECKPOINT)
    if cluster.world > 1:
        dist.barrier()


def resumable_checkpoint(output: Path) -> Path | None:
    """The single-file checkpoint of `output`, if there is one."""
    return output / CHECKPOINT if (output / CHECKPOINT).is_file() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restores model, optimizer, scheduler and RNG from a single-file checkpoint; returns the step."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


def save_sharded_checkpoint(cluster, output, model, optimizer, scheduler, step) -> None:
    """Every rank writes its shards into a staging directory; rank 0 adds the loop state and swaps
    it in for the previous checkpoint (a kill leaves the previous one, possibly as `.old`)."""
    final = output / SHARDED_CHECKPOINT
    staging, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if cluster.main:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(staging))
    if cluster.main:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step},
                   staging / LOOP_STATE)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_checkpoint_of(output: Path) -> Path | None:
    """The directory to resume from with --fsdp: the checkpoint, or the previous one when a kill
    came in the middle of the swap."""
    for name in (SHARDED_CHECKPOINT, SHARDED_CHECKPOINT + ".old"):
        if (output / name / LOOP_STATE).is_file():
            return output / name
    return None


def load_sharded_checkpoint(directory: Path, model, optimizer, scheduler) -> int:
    """Restores model and optimizer shards, scheduler and RNG from `directory`; returns the step."""
    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    load_sharded_state(model, optimizer, state)
    loop_state = torch.load(directory / LOOP_STATE, map_location="cpu", weights_only=False)
    scheduler.load_state_dict(loop_state["scheduler"])
    set_rng_state(loop_state["rng"])
    return loop_state["step"]
