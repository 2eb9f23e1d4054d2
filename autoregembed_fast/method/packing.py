"""Padding-free transformer passes: the sequences of a right-padded batch packed end to end into a
few rows, each sequence restarting its position ids at 0.

Hugging Face models (transformers >= 5, every model built on `masking_utils`) read restarting
position ids, given without an attention mask and without a KV cache, as packed sequences: the
attention mask becomes block-diagonal causal (varlen kernels with flash attention), so a packed pass
gives every sequence exactly what it gets alone. Callers must pass ``use_cache=False``: with a cache
the packing is not detected and sequences attend to each other.

A model whose attention ignores that (custom modelling code, say) would let packed sequences see
each other and give silently wrong states: `check_packing_support` probes each model once and
raises instead.

Rows hold at most `PACKED_ROW_TOKENS` tokens (or the longest sequence): with a dense
block-diagonal mask (SDPA and eager attention) a row's attention costs its length squared, so one
row of everything wastes more on masked-out products than padding did. Each row's unused tail is
one more sequence of its own (zeros), never read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 48 NLI texts (1,748 tokens, 22-79 each) through SmolLM2-135M, forward + backward on 2 CPU cores
# (AMD EPYC with AVX-512): rows of <= 192-384 tokens 6.9-7.2 s, <= 1024 9.4 s, one row 10.6 s, one
# padded batch 16.2 s (NOTES.md, "Packing").
PACKED_ROW_TOKENS = 256


@dataclass(frozen=True)
class Packing:
    """Where the sequences of a right-padded batch [B, T] sit in a packed batch [rows, length]:
    sequence b is row `row[b]`, columns `start[b]` .. `start[b] + lengths[b] - 1`."""

    lengths: torch.Tensor  # [B]
    row: torch.Tensor  # [B]
    start: torch.Tensor  # [B]
    position_ids: torch.Tensor  # [rows, length]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.position_ids.shape)

    def locate(self, sequence_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the packed batch of positions [B, n] of each sequence."""
        return self.row[:, None].expand_as(sequence_positions), self.start[:, None] + sequence_positions


def packing_of(lengths: torch.Tensor, device, max_row_tokens: int | None = None) -> Packing:
    """Packs sequences of the given lengths (each >= 1) into as few rows as greedy balancing allows:
    from the lower bound up, the first row count for which placing the sequences longest first,
    each into the emptiest row, keeps every row within max(max_row_tokens (default
    `PACKED_ROW_TOKENS`), longest) tokens. Balanced rows leave short tails and the shortest
    rows (a row's attention costs its length squared)."""
    sizes = [int(n) for n in lengths.tolist()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"packing needs sequences of at least one token, got lengths {sizes}")
    capacity = max(PACKED_ROW_TOKENS if max_row_tokens is None else max_row_tokens, max(sizes))
    longest_first = sorted(range(len(sizes)), key=lambda b: -sizes[b])
    n_rows = -(-sum(sizes) // capacity)
    while True:  # ends by n_rows = len(sizes) at the latest: one sequence per row fits
        row, start, used = [0] * len(sizes), [0] * len(sizes), [0] * n_rows
        for b in longest_first:
            r = min(range(n_rows), key=used.__getitem__)
            row[b], start[b] = r, used[r]
            used[r] += sizes[b]
        if max(used) <= capacity:
            break
        n_rows += 1
    length = max(used)
    position_ids = torch.empty(n_rows, length, dtype=torch.long)
    for b, size in enumerate(sizes):
        position_ids[row[b], start[b] : start[b] + size] = torch.arange(size)
    for r, n in enumerate(used):
        position_ids[r, n:] = torch.arange(length - n)  # the tail: a sequence of its own
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Packing(as_tensor(sizes), as_tensor(row), as_tensor(start), position_ids.to(device))


def _real_positions(packing: Packing, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    steps = torch.arange(width, device=packing.lengths.device)
    return (steps[None, :] < packing.lengths[:, None]).nonzero(as_tuple=True)


def pack_sequences(values: torch.Tensor, packing: Packing) -> torch.Tensor:
    """values [B, T, ...] of right-padded sequences -> [rows, length, ...] (zeros in the tails).
    Differentiable."""
    sequence, step = _real_positions(packing, values.shape[1])
    packed = values.new_zeros(*packing.shape, *values.shape[2:])
    packed[packing.row[sequence], packing.start[sequence] + step] = values[sequence, step]
    return packed


def unpack_sequences(packed: torch.Tensor, packing: Packing, width: int) -> torch.Tensor:
    """The inverse of `pack_sequences`: [rows, length, ...] -> [B, width, ...], zeros past each sequence's
    length. Differentiable."""
    sequence, step = _real_positions(packing, width)
    values = packed.new_zeros(len(packing.lengths), width, *packed.shape[2:])
    values[sequence, step] = packed[packing.row[sequence], packing.start[sequence] + step]
    return values


def check_packing_support(base_model) -> None:
    """Raises if `base_model` (a Hugging Face base model: embeddings + layers) lets packed sequences
    attend to each other. Probed once per module: the same second sequence packed after two
    different first ones must get the same states. Both passes have the same shapes and kernels, so
    without leakage they agree to rounding noise at most, whatever the dtype; a leak moves them by
    percents even in a tiny random model."""
    if getattr(base_model, "_autoregembed_packing_checked", False):
        return
    embeddings = base_model.get_input_embeddings()
    device, vocab_size = embeddings.weight.device, embeddings.weight.shape[0]
    steps = torch.arange(16, device=device)
    second = torch.arange(3, device=device) % vocab_size
    packing = packing_of(torch.tensor([16, 3]), device, max_row_tokens=19)  # one row
    was_training = base_model.training
    base_model.eval()  # no dropout in the comparison
    try:
        with torch.no_grad():
            states = [base_model(input_ids=torch.cat([first % vocab_size, second])[None],
                                 position_ids=packing.position_ids, use_cache=False
                                 ).last_hidden_state[0, 16:].float()
                      for first in (7 * steps + 3, 11 * steps + 5)]
    finally:
        base_model.train(was_training)
    difference = (states[0] - states[1]).norm() / states[1].norm()
    if not difference <= 1e-3:
        raise ValueError(
            f"{type(base_model).__name__} does not read restarting position_ids as packed sequences "
            f"(a packed sequence's states change by {difference:.2g} relative with the sequence "
            "packed before it): run it padded (`python -m autoregembed_fast.train ... --no-packing`; "
            "in code AutoRegEmbed.compress(..., packed=False), score_targets(..., packed=False)).")
    base_model._autoregembed_packing_checked = True
