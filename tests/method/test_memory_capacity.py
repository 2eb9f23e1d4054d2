"""bench.method.memory_capacity on a tiny model: optimised vectors become readable memory (own far below
other and none), and a given encoder's NLLs agree with the decoder's own forward and loss."""

import json

import pytest
import torch

from bench.method import memory_capacity
from autoregembed_fast.method.loading import load_causal_lm, load_encoder
from autoregembed_fast.method.data import Tokenization, compression_batch
from tiny_models import save_tiny_base, stage1_rows, write_jsonl


@torch.no_grad()
def decoder_forward_nlls(encoder, decoder, rows) -> dict:
    """Per-token NLL of each text from its own memory and from the memory of the text half the list
    away, through the decoder's own forward and loss ([memory ; embedded target], labels -100 on
    the memory): no code of the package's scoring."""
    memories, targets = [], []
    for row in rows:
        batch = compression_batch(encoder.tokenizer, [row], Tokenization())
        memories.append(encoder(batch["input_ids"], batch["attention_mask"]))
        targets.append(batch["target_ids"])
    result = {}
    for name, shift in (("own", 0), ("other", len(rows) // 2)):
        total, tokens = 0.0, 0
        for i, target in enumerate(targets):
            memory = memories[(i + shift) % len(rows)]
            embeds = torch.cat([memory, decoder.get_input_embeddings()(target)], dim=1)
            labels = torch.cat([torch.full((1, memory.shape[1]), -100), target], dim=1)
            total += float(decoder(inputs_embeds=embeds, labels=labels).loss) * target.shape[1]
            tokens += target.shape[1]
        result[name] = total / tokens
    return result


def test_optimised_vectors_carry_their_text(tmp_path):
    base = save_tiny_base(tmp_path / "base", weight_scale=20.0)
    texts = write_jsonl(tmp_path / "texts.jsonl", stage1_rows(6))
    decoder, tokenizer = load_causal_lm(str(base))
    rows = memory_capacity.read_texts(texts, 6)
    memory, losses = memory_capacity.optimise_memory(decoder.requires_grad_(False), tokenizer, rows,
                                                     k=3, steps=40, lr=0.5)
    assert memory.shape == (6, 3, 32)
    assert losses[-1] < losses[0] - 2.0

    torch.manual_seed(0)
    encoder = load_encoder(str(base), 3)
    encoder.save_pretrained(tmp_path / "encoder")
    results = memory_capacity.main(["--model", str(base), "--texts", str(texts), "--limit", "6",
                                    "--k", "3", "--steps", "40", "--lr", "0.5", "--bootstrap", "50",
                                    "--encoder", str(tmp_path / "encoder"),
                                    "--json", str(tmp_path / "out.json")])
    optimised = results["optimised"]
    # Six random sentences over a tiny vocabulary: the optimised memory must beat both baselines by
    # a wide margin (a decoder reading nothing from it would leave own = other).
    assert optimised["other_minus_own"] > 1.0 and optimised["none_minus_own"] > 1.0
    assert optimised["other_minus_own_ci95"][0] > 0
    encoder_result = results["encoders"][str(tmp_path / "encoder")]
    expected = decoder_forward_nlls(load_encoder(str(tmp_path / "encoder")).eval(), decoder.eval(), rows)
    for name in ("own", "other"):
        assert abs(encoder_result[name] - expected[name]) < 1e-4 * expected[name]
    assert json.loads((tmp_path / "out.json").read_text())["texts"] == 6


def test_triplet_files_become_sorted_unique_sentences(tmp_path):
    rows = [{"query": "b q", "pos": "a p", "neg": "c n"}, {"query": "a p", "pos": "d p", "neg": "b q"}]
    texts = memory_capacity.read_texts(write_jsonl(tmp_path / "t.jsonl", rows), 10)
    assert [row["output"] for row in texts] == ["a p", "b q", "c n", "d p"]
    assert all(row["context"] == row["output"] for row in texts)


def test_too_few_texts_is_refused(tmp_path):
    texts = write_jsonl(tmp_path / "t.jsonl", stage1_rows(3))
    with pytest.raises(SystemExit, match="at least 2 texts"):
        memory_capacity.read_texts(texts, 1)
