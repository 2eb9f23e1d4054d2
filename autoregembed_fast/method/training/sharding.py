"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainable encoder: parameters, gradients and
AdamW's state sharded over the ranks, one unit per decoder layer and one for the rest. Every pass
all-gathers the layers, so all ranks must make the same passes: each encoder call is one pass
whatever the lengths of a rank's texts (they run packed, `autoregembed_fast.method.packing`).

The frozen decoder is not sharded: it is never updated, so each rank holds a replica in the
checkpoint's dtype (a 7B model in bf16: 14 GB per GPU, less than its sharded AdamW state would save
on the encoder side); the scoring pass then needs no all-gather per layer.

Checkpoints are `torch.distributed.checkpoint` directories (each rank writes its shard); the final
model is gathered to rank 0 as a full state dict and saved as a plain Hugging Face directory, which
`AutoRegEmbed.from_pretrained` loads in one process.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_encoder(model, bf16: bool) -> None:
    """fully_shard every decoder layer of model.encoder, then model itself (in place). With bf16,
    FSDP2's mixed precision: bf16 compute on all-gathered parameters, fp32 master weights, optimizer
    state and gradient reduction."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for layer in model.encoder.base_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def sharded_state(model, optimizer) -> dict:
    """This rank's shards of the model and optimizer state, for torch.distributed.checkpoint.save."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_state(model, optimizer, state: dict) -> None:
    """Puts a state loaded by torch.distributed.checkpoint.load (in place into `sharded_state`'s
    structure) back into the model and optimizer."""
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def full_model_state(model) -> dict:
    """The unsharded model state dict on rank 0 (on the CPU), empty on the other ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
