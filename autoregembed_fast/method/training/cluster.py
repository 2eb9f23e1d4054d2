"""Distributed set-up and data order of the training loop: the process group (one process, or DDP
under torchrun: gloo on CPU, nccl on GPU) and each rank's slice of every global batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Cluster:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, compute):
        """compute() run on rank 0 only, its (picklable) result broadcast to every rank: for work
        that must not be repeated per rank, such as hashing a 7B model's files."""
        if self.world == 1:
            return compute()
        box = [compute() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_all(self, value) -> list:
        """Every rank's (picklable) value, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

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
