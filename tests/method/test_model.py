"""AutoRegEmbed, the encoder: its settings, its memory (a batch equals each text alone, packed or
padded), and saving and reloading."""

import pytest
import torch

from autoregembed_fast.method.loading import load_causal_lm
from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings
from tiny_models import save_tiny_base

# Packed into one row (the default row budget), into rows of at most 16 tokens, or one right-padded
# batch: (packed, row budget).
LAYOUTS = {"packed": (True, None), "packed-rows-of-16": (True, 16), "padded": (False, None)}


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan")])
def test_memory_norm_must_be_positive(bad):
    with pytest.raises(ValueError, match="memory_norm"):
        MemorySettings(k=2, memory_norm=bad)


@pytest.mark.parametrize("memory_layer", [None, 1], ids=["last-hidden", "layer-1"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compress_of_a_batch_equals_each_text_alone(monkeypatch, tmp_path, layout, memory_layer):
    """A batch mixing short and long texts, packed (in one row or several) or padded: every row's
    memory and gradients (embedding matrix and compress-token embeddings) must be what the row gives
    alone (no padding at all); with `memory_layer`, the memory is that layer's output, captured
    here by a forward hook."""
    packed, row_tokens = LAYOUTS[layout]
    if row_tokens is not None:
        monkeypatch.setattr("autoregembed_fast.method.packing.PACKED_ROW_TOKENS", row_tokens)
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=3, memory_layer=memory_layer))
    captured = []
    if memory_layer is not None:
        layer = encoder.base_model.layers[memory_layer - 1]
        layer.register_forward_hook(lambda module, args, output: captured.append(
            output[0] if isinstance(output, tuple) else output))
    lengths = [4, 50, 2, 47, 3]
    vocab = encoder.get_input_embeddings().weight.shape[0] - 3  # not the compress tokens
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(0, vocab, (length,))
        mask[row, :length] = 1
    upstream = torch.randn(len(lengths), 3, model.hidden_size)

    batch_memory = model(ids, mask, packed=packed)
    (batch_memory * upstream).sum().backward()
    batch_grads = [encoder.get_input_embeddings().weight.grad.clone(),
                   model.compress_embeddings.grad.clone()]
    model.zero_grad()
    alone = []
    for row, length in enumerate(lengths):
        captured.clear()
        memory = model(ids[row : row + 1, :length], mask[row : row + 1, :length], packed=False)
        if memory_layer is not None:
            assert torch.equal(memory[0], captured[0][0, length : length + 3])
        (memory * upstream[row]).sum().backward()
        alone.append(memory.detach())
    assert torch.allclose(batch_memory.detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    alone_grads = [encoder.get_input_embeddings().weight.grad, model.compress_embeddings.grad]
    for batch_grad, alone_grad in zip(batch_grads, alone_grads):
        assert alone_grad.abs().max() > 0
        assert (batch_grad - alone_grad).abs().max() <= 1e-5 * alone_grad.abs().max()


def test_an_inner_memory_layer_runs_and_trains_only_the_layers_up_to_it(tmp_path):
    """memory_layer 1 of the tiny model's 2 layers: layer 2 and the final norm neither run in
    compress nor train, the memory is the encoder's full forward's hidden_states[1] at the compress
    tokens, and the encoder has its own modules back after the call."""
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=2, memory_layer=1))
    base = encoder.base_model
    layers, norm = base.layers, base.norm
    ran = []
    layers[1].register_forward_hook(lambda *_: ran.append("layer 2"))
    norm.register_forward_hook(lambda *_: ran.append("norm"))
    ids = torch.randint(0, 50, (1, 6))

    memory = model(ids, torch.ones_like(ids), packed=False)

    assert ran == []
    assert base.layers is layers and len(layers) == 2 and base.norm is norm
    assert all(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in [*layers[1].parameters(), *norm.parameters()])
    inputs = torch.cat([encoder.get_input_embeddings()(ids)[0], model.compress_embeddings])
    with torch.no_grad():
        full = base(inputs_embeds=inputs[None], output_hidden_states=True).hidden_states[1]
    assert ran == ["layer 2", "norm"]
    torch.testing.assert_close(memory.detach()[0], full[0, -2:], rtol=1e-6, atol=1e-6)


def test_an_inner_memory_layer_needs_llama_style_layers_and_norm():
    """GPT-2 names its layers `h` and its final norm `ln_f`: a clear error, not a wrong memory."""
    from transformers import GPT2Config, GPT2Model

    from autoregembed_fast.method.model import layers_and_final_norm

    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(ValueError, match="GPT2Model has not"):
        layers_and_final_norm(gpt2)


@pytest.mark.parametrize("bad", [0, 2, -1])
def test_memory_layer_must_be_an_inner_layer(tmp_path, bad):
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    with pytest.raises(ValueError, match=r"memory_layer must be in \[1, 1\]"):
        AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=2, memory_layer=bad))


def test_compress_refuses_a_left_padded_batch(tmp_path):
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=2))
    ids = torch.randint(0, 50, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded.*row 1"):
        model(ids, mask)


def test_saved_settings_and_compress_embeddings_survive_a_reload(tmp_path):
    """memory_layer, bos_before_memory, memory_norm, the memory projection and the trained
    compress-token embeddings (a parameter apart from the embedding matrix) come back from
    save_pretrained / from_pretrained: the reloaded model gives the same memory."""
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(
        k=2, memory_norm=2.5, bos_before_memory=True, memory_layer=1, memory_projection=True))
    with torch.no_grad():
        model.compress_embeddings.add_(torch.randn_like(model.compress_embeddings))
        model.memory_projection.weight.add_(0.1 * torch.randn_like(model.memory_projection.weight))
        model.memory_projection.bias.normal_()
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoRegEmbed.from_pretrained(tmp_path / "saved")
    assert loaded.settings == model.settings
    assert torch.equal(loaded.memory_projection.weight, model.memory_projection.weight)
    assert torch.equal(loaded.compress_embeddings, model.compress_embeddings)
    ids, mask = model.tokenize_texts(["a man plays", "two dogs run here"])
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_the_memory_projection_starts_at_the_identity_and_trains(tmp_path):
    base = str(save_tiny_base(tmp_path / "base"))
    torch.manual_seed(0)
    plain = AutoRegEmbed.from_base(*load_causal_lm(base), MemorySettings(k=2))
    torch.manual_seed(0)
    projected = AutoRegEmbed.from_base(*load_causal_lm(base),
                                       MemorySettings(k=2, memory_projection=True))
    ids, mask = plain.tokenize_texts(["a man plays", "two dogs run here"])
    memory = projected(ids, mask)
    assert torch.allclose(memory, plain(ids, mask), rtol=1e-6, atol=1e-6)
    memory.square().sum().backward()
    assert projected.memory_projection.weight.grad.abs().max() > 0
