"""Text embedders for evaluation: AutoRegEmbed's memory pooling (the mean of the k memory embeddings)
and a causal LM's last hidden state after the "in one word" prompt (the untrained baseline). Used by
`evaluate` and by the sentence-transformers module."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from autoregembed_fast.method.data import EVAL_PROMPT, length_batches, prompted_batch
from autoregembed_fast.method.loading import load_causal_lm, load_encoder
from autoregembed_fast.method.model import CONFIG_FILE, AutoRegEmbed


def last_token_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, d] fp32, L2-normalised: a causal LM's last hidden state at each right-padded row's last
    real token."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    return F.normalize(hidden[torch.arange(len(input_ids)), last].float(), dim=-1)


def last_token_embedder(model, tokenizer, prompt: str = EVAL_PROMPT, batch_size: int = 32):
    """Embeds texts by the base model's last hidden state at the prompt's last token."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def embed(texts):
        embeddings = torch.empty(len(texts), model.get_input_embeddings().weight.shape[1])
        for index in length_batches(texts, batch_size):
            ids, mask = prompted_batch(tokenizer, [texts[i] for i in index], prompt)
            embeddings[index] = last_token_embeddings(model, ids.to(device), mask.to(device)).cpu()
        return embeddings

    return embed


def causal_lm_of(encoder: str):
    """(causal LM, tokenizer) that last-token pooling reads: a saved AutoRegEmbed's trained encoder,
    or a base model (directory or "smollm2")."""
    if Path(encoder, CONFIG_FILE).is_file():
        saved = AutoRegEmbed.from_pretrained(encoder)
        return saved.encoder, saved.tokenizer
    return load_causal_lm(encoder)


def build_embedder(encoder: str, pooling: str, k: int, batch_size: int):
    if pooling == "memory":
        model = load_encoder(encoder, k).eval()
        return lambda texts: model.encode(texts, batch_size=batch_size)
    base, tokenizer = causal_lm_of(encoder)
    return last_token_embedder(base.eval(), tokenizer, batch_size=batch_size)
