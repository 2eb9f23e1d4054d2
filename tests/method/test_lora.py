"""LoRA on the encoder: merging keeps the memory, training moves only adapters and compress-token
embeddings, and the combination with FSDP2 is refused with a clear error."""

import pytest
import torch

from autoregembed_fast.method.training import commands as train
from autoregembed_fast.method.lora import add_lora, merge_lora
from autoregembed_fast.method.loading import load_causal_lm
from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings
from tiny_models import save_tiny_base, stage1_rows, write_jsonl

# The runs below test the loop's mechanics on a cosine schedule: the default, the released runs'
# warmup-decay, spends its first 2 steps at rate 0 (test_warmup_decay_is_deepspeeds_schedule).
COSINE = ["--lr-schedule", "cosine"]


def test_merged_adapters_give_the_memory_of_the_adapted_model(tmp_path):
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=2))
    add_lora(model, 4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "compress_embeddings" in trainable
    assert all("lora_" in name for name in trainable - {"compress_embeddings"})
    assert len(trainable) == 1 + 2 * 7 * 2  # 2 layers x 7 linear layers x (A, B)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    ids, mask = model.tokenize_texts(["a man plays", "two dogs run here"])
    with torch.no_grad():
        adapted = model(ids, mask)
        plain_start = AutoRegEmbed.from_base(*load_causal_lm(str(tmp_path / "base")),
                                             MemorySettings(k=2))
        plain_start.compress_embeddings.copy_(model.compress_embeddings)
        assert (plain_start(ids, mask) - adapted).abs().max() > 1e-2  # the adapters matter
        assert merge_lora(model) == 14
        merged = model(ids, mask)
    assert torch.allclose(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not any("peft" in type(m).__module__ for m in model.modules())


def test_adapters_sit_only_below_an_inner_memory_layer_and_all_get_gradients(tmp_path):
    """Memory from layer 1 of 2: layer 2 cannot reach it, so it gets no adapters (they would get
    no gradient, and DDP would wait for them)."""
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base")))
    model = AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=2, memory_layer=1))
    add_lora(model, 4)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 1 + 7 * 2  # compress embeddings + layer 1's 7 linear layers x (A, B)
    assert all(".layers.0." in name for name in trainable if "lora_" in name)
    ids, mask = model.tokenize_texts(["a man plays", "two dogs run here"])
    model(ids, mask).square().sum().backward()
    assert [name for name, p in trainable.items() if p.grad is None] == []


@pytest.mark.parametrize("memory_layer", [None, 1], ids=["last-hidden", "layer-1"])
def test_compress_with_lora_trains_adapters_only(tmp_path, memory_layer):
    base = save_tiny_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "stage1.jsonl", stage1_rows(8))
    layer_flags = [] if memory_layer is None else ["--memory-layer", str(memory_layer)]
    train.main(["compress", *COSINE, "--model", str(base), "--data", str(data), "--output", str(tmp_path / "out"),
                "--batch-size", "4", "--steps", "2", "--lr", "1e-2", "--lora", "4", *layer_flags])
    start = load_causal_lm(str(base))[0].state_dict()
    saved = AutoRegEmbed.from_pretrained(tmp_path / "out" / "model")
    state = saved.encoder.state_dict()
    assert state.keys() == start.keys()  # a plain model: no adapter weights left
    changed = {name for name in start if not torch.equal(start[name], state[name][: len(start[name])])}
    reaching = ("model.layers.0.", "model.layers.1.")[: memory_layer or 2]
    linear = {name for name in start if name.endswith("proj.weight") and name.startswith(reaching)}
    assert changed == linear  # every adapted layer moved; norms, embedding rows, layers above did not
    # The base rows are the base model's (compared above); the 5 compress-token rows were added.
    assert state["model.embed_tokens.weight"].shape[0] == start["model.embed_tokens.weight"].shape[0] + 5


@pytest.mark.parametrize("extra, message", [(["--lora", "4", "--fsdp"], "--lora does not combine with --fsdp"),
                                            (["--lora", "-2"], "--lora RANK must be positive")])
def test_lora_refusals(tmp_path, capsys, extra, message):
    base = save_tiny_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "stage1.jsonl", stage1_rows(8))
    with pytest.raises(SystemExit):
        train.main(["compress", "--model", str(base), "--data", str(data), "--output",
                    str(tmp_path / "out"), *extra])
    assert message in capsys.readouterr().err
