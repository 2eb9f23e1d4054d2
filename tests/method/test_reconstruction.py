"""Reconstruction NLL from own / other / no memory: against the decoder run directly, one text at a
time with its own logits; and the bootstrap summary against sums taken by hand."""

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from autoregembed_fast.method.data import Tokenization, compression_batch
from autoregembed_fast.method.loading import load_causal_lm, load_encoder
from autoregembed_fast.method.reconstruction import per_text_nll, reconstruction_nlls, summarise
from tiny_models import save_tiny_base, stage1_rows


def direct_nlls(model, decoder, rows, other_shift, bos_before_memory=False):
    """Per-text NLL sums {own, other, none} and token counts, by the decoder's own logits in float64;
    with `bos_before_memory` the decoder reads [bos ; memory ; text]."""
    batch = compression_batch(model.tokenizer, rows, Tokenization())
    embed = decoder.get_input_embeddings()
    sums, counts = {"own": [], "other": [], "none": []}, []
    with torch.no_grad():
        memory = model(batch["input_ids"], batch["attention_mask"])
        bos = embed.weight[model.tokenizer.bos_token_id][None]
        if bos_before_memory:
            memory = torch.cat([bos.expand(len(rows), 1, -1), memory], dim=1)
        for i in range(len(rows)):
            target = batch["target_ids"][i][batch["target_mask"][i].bool()]
            prefixes = {"own": memory[i], "other": memory[(i + other_shift) % len(rows)],
                        "none": bos}
            for name, prefix in prefixes.items():
                inputs = torch.cat([prefix, embed(target)])[None]
                logits = decoder(inputs_embeds=inputs).logits[0, len(prefix) - 1 : -1]
                sums[name].append(F.cross_entropy(logits.double(), target, reduction="sum").item())
            counts.append(len(target))
    return sums, counts


@pytest.mark.parametrize("bos_before_memory", [False, True], ids=["released-layout", "bos-first"])
def test_reconstruction_nlls_against_the_decoder_run_directly(tmp_path, bos_before_memory):
    """"none" is the decoder's own loss on <bos> + target; "own" and "other" read the memory of the
    sentence itself and of the one half the list away (5 rows: 2 away), each scored one at a time,
    in the model's layout ([memory ; text] or [bos ; memory ; text])."""
    base = str(save_tiny_base(tmp_path / "base", weight_scale=5.0))
    torch.manual_seed(0)
    model = load_encoder(base, 3).eval()
    model.settings = replace(model.settings, bos_before_memory=bos_before_memory)
    decoder = load_causal_lm(base)[0].eval()
    rows = stage1_rows(5)
    got = reconstruction_nlls(model, decoder, rows, batch_size=2, samples=200)
    sums, counts = direct_nlls(model, decoder, rows, 2, bos_before_memory)
    layouts_differ = direct_nlls(model, decoder, rows, 2, not bos_before_memory)[0]["own"]
    # The two layouts score differently (so the comparison above tells them apart).
    assert max(abs(a - b) for a, b in zip(layouts_differ, sums["own"])) > 0.1
    for name, values in sums.items():
        expected = sum(values) / sum(counts)
        assert abs(got[name] - expected) <= 1e-5 * expected
    assert abs(got["other_minus_own"] - (sum(sums["other"]) - sum(sums["own"])) / sum(counts)) < 1e-5
    assert got["own"] != got["other"]
    assert got["texts"] == 5 and got["tokens"] == sum(counts)

    memory = torch.zeros(4, 3, 32)
    for bad in (memory, memory[:5, :, :16]):  # 4 memories for 5 rows; wrong d
        try:
            per_text_nll(decoder, model.tokenizer, bad, rows)
        except ValueError as error:
            assert "memory" in str(error) or "hidden size" in str(error)
        else:
            raise AssertionError("a memory that does not fit the rows was accepted")


def test_summary_intervals_resample_texts_not_tokens():
    """Per-token NLL is total NLL / total tokens (a long text weighs more); the interval of each
    statistic is a paired bootstrap over texts, so it brackets the point value and the gaps' intervals
    come from the same resamples (a constant gap has a zero-width interval)."""
    generator = torch.Generator().manual_seed(3)
    counts = torch.randint(3, 30, (40,), generator=generator).double()
    own = counts * (2 + torch.rand(40, generator=generator, dtype=torch.float64))
    sums = torch.stack([own, own + 0.5 * counts, own + 2 * counts])
    result = summarise(sums, counts, samples=300)
    assert abs(result["own"] - float(own.sum() / counts.sum())) < 1e-12
    assert abs(result["other_minus_own"] - 0.5) < 1e-12 and abs(result["none_minus_own"] - 2) < 1e-12
    low, high = result["own_ci95"]
    assert low < result["own"] < high
    assert max(abs(v - 0.5) for v in result["other_minus_own_ci95"]) < 1e-12
