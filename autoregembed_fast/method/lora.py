"""LoRA on the encoder (`--lora RANK`, through `peft`): low-rank adapters on every linear layer of
the encoder's decoder layers that reach the memory, trained with the compress-token embeddings
while the rest of the encoder stays frozen; merged into the weights before the model is saved, so
a saved model is a plain Hugging Face directory like any other."""

from __future__ import annotations

from torch import nn

from autoregembed_fast.method.model import AutoRegEmbed, layers_and_final_norm


def add_lora(model: AutoRegEmbed, rank: int) -> None:
    """Injects LoRA adapters (rank `rank`, alpha 2 * rank, no dropout) into the encoder's base
    model, in place (`linear_layers_reaching_the_memory`); only the adapters and the compress-token
    embeddings train."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    model.encoder.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=linear_layers_reaching_the_memory(model))
    inject_adapter_in_model(config, model.encoder.base_model)
    model.compress_embeddings.requires_grad_(True)


def linear_layers_reaching_the_memory(model: AutoRegEmbed) -> str | list[str]:
    """peft's `target_modules`: every linear layer, or with an inner `memory_layer` L those of the
    first L decoder layers, named as in the encoder's base model (adapters above L would get no
    gradient, and DDP would wait for them)."""
    if model.memory_layer is None:
        return "all-linear"
    layers, _ = layers_and_final_norm(model.encoder.base_model)
    return [f"layers.{index}.{name}" for index in range(model.memory_layer)
            for name, module in layers[index].named_modules() if isinstance(module, nn.Linear)]


def merge_lora(model: AutoRegEmbed) -> int:
    """Folds every LoRA adapter into its linear layer's weight and puts the plain layer back (in
    place); returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, module) for name, module in model.encoder.named_modules()
               if isinstance(module, LoraLayer)]
    for name, module in adapted:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.encoder.get_submodule(parent_name) if parent_name else model.encoder
        base_layer = module.get_base_layer()
        assert isinstance(base_layer, nn.Linear)
        setattr(parent, child, base_layer)
    return len(adapted)
