"""Packing: the layout (every sequence once, rows within budget, restarting positions), pack/unpack
as exact inverses with gradients, and a packed pass of every supported model family equal to each
sequence run alone."""

import pytest
import torch

from autoregembed_fast.method.packing import (
    check_packing_support,
    pack_sequences,
    packing_of,
    unpack_sequences,
)
from tiny_models import FAMILIES, VOCAB, family_config, tiny_model


@pytest.mark.parametrize("seed", range(12))
def test_layout_places_every_sequence_once_within_the_row_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 20, (1,), generator=generator))
    lengths = torch.randint(1, 60, (n,), generator=generator)
    budget = [8, 32, 100, 1000][seed % 4]
    packing = packing_of(lengths, "cpu", budget)
    rows, length = packing.shape
    capacity = max(budget, int(lengths.max()))
    assert length <= capacity
    occupied = torch.zeros(rows, length, dtype=torch.long)
    for b in range(n):
        columns = slice(int(packing.start[b]), int(packing.start[b] + lengths[b]))
        occupied[packing.row[b], columns] += 1
        assert packing.position_ids[packing.row[b], columns].tolist() == list(range(int(lengths[b])))
    assert occupied.max() == 1 and int(occupied.sum()) == int(lengths.sum())
    for r in range(rows):  # each row: its sequences end to end, then a tail restarting at 0
        used = int(occupied[r].sum())
        assert occupied[r, :used].all() and not occupied[r, used:].any()
        assert packing.position_ids[r, used:].tolist() == list(range(length - used))
    # Balanced: each sequence went to the emptiest row, so rows differ by at most the longest one.
    fills = occupied.sum(dim=1)
    assert int(fills.max() - fills.min()) <= int(lengths.max())
    if int(lengths.sum()) <= capacity:
        assert rows == 1


def test_layout_refuses_empty_sequences():
    with pytest.raises(ValueError, match="at least one token"):
        packing_of(torch.tensor([3, 0, 2]), "cpu")
    with pytest.raises(ValueError, match="at least one token"):
        packing_of(torch.tensor([], dtype=torch.long), "cpu")


@pytest.mark.parametrize("trailing", [(), (5,)], ids=["ids", "vectors"])
def test_pack_then_unpack_is_the_identity_on_real_positions_and_differentiable(trailing):
    lengths = torch.tensor([3, 7, 1, 5])
    values = torch.randn(4, 9, *trailing, dtype=torch.float64)
    packing = packing_of(lengths, "cpu", max_row_tokens=8)
    packed = pack_sequences(values.requires_grad_(), packing)
    assert packed.shape == (*packing.shape, *trailing)
    assert packed.abs().sum() > 0 and int((packed != 0).reshape(*packing.shape, -1).any(-1).sum()) == 16
    back = unpack_sequences(packed, packing, 9)
    real = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.equal(back[real], values[real].detach())
    assert not back[~real].any()
    upstream = torch.randn_like(back)
    back.backward(upstream)
    assert torch.equal(values.grad[real], upstream[real]) and not values.grad[~real].any()


def run_alone(base, embeddings, lengths):
    return [base(inputs_embeds=embeddings[b : b + 1, :n], use_cache=False).last_hidden_state[0]
            for b, n in enumerate(lengths.tolist())]


@pytest.mark.parametrize("family", FAMILIES + ["gemma2-sliding-window-3"])
def test_a_packed_pass_gives_every_sequence_what_it_gets_alone(family):
    """transformers reads restarting position ids (no mask, no cache) as packed sequences; rows of
    at most 12 tokens force several rows with tails. A window of 3 positions checks that the
    sliding-window mask composes with the packing."""
    if family == "gemma2-sliding-window-3":
        model_class, config = family_config("gemma2")
        config.sliding_window = 3
        torch.manual_seed(0)
        model = model_class(config).float()
    else:
        model = tiny_model(family)
    base = model.eval().base_model
    lengths = torch.tensor([4, 9, 1, 6, 3])
    embeddings = model.get_input_embeddings()(torch.randint(0, VOCAB, (5, 9)))
    alone = run_alone(base, embeddings, lengths)
    packing = packing_of(lengths, "cpu", max_row_tokens=12)
    assert packing.shape[0] > 1
    hidden = base(inputs_embeds=pack_sequences(embeddings, packing),
                  position_ids=packing.position_ids, use_cache=False).last_hidden_state
    hidden = unpack_sequences(hidden, packing, 9)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(hidden[b, :n], alone[b], rtol=1e-5, atol=1e-5), (family, b)


def test_a_model_whose_attention_crosses_packed_sequences_is_refused(monkeypatch):
    """Restarting position ids that the mask does not follow (what a model outside transformers'
    masking utilities does): the probe sees the second sequence attend to the first and raises,
    and score_targets with it, instead of scoring from mixed-up states."""
    from autoregembed_fast import score_targets

    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices", lambda *a: None)
    decoder = tiny_model("smollm").eval()
    with pytest.raises(ValueError, match="packed=False"):
        check_packing_support(decoder.base_model)
    memory = torch.randn(1, 2, decoder.config.hidden_size)
    ids, mask, index = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([0])
    with pytest.raises(ValueError, match="does not read restarting position_ids"):
        score_targets(decoder, memory, ids, mask, index)
    assert score_targets(decoder, memory, ids, mask, index, packed=False).shape == (1,)


def test_the_packing_probe_runs_once_per_model(monkeypatch):
    base = tiny_model("qwen2").base_model
    calls = []
    forward = base.forward
    monkeypatch.setattr(base, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    check_packing_support(base)
    check_packing_support(base)
    assert len(calls) == 2  # alone + packed, once
