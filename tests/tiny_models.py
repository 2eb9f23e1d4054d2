"""Tiny random Hugging Face decoders for tests (built from a config; nothing comes from a hub)."""

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size=97, hidden_size=32, *, tied=True, head_bias=False, layers=2,
               max_positions=64):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if head_bias:
        model.lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model.eval().requires_grad_(False)


def tiny_gemma2(vocab_size=101, hidden_size=32, softcap=5.0):
    """A decoder whose config carries final_logit_softcapping (applied by its own forward)."""
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, final_logit_softcapping=softcap, attn_logit_softcapping=None,
        sliding_window=64,
    )
    return Gemma2ForCausalLM(config).eval().requires_grad_(False)
