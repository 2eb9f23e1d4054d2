"""How much of a text its memory carries: the frozen decoder's NLL of regenerating each text from its
own memory, from another text's memory and from no memory, with bootstrap intervals.

Compression is the gap between "own" and the other two: a memory that is a generic prefix lowers
"own" and "other" alike; only a memory that summarises its text lowers "own" alone.
"""

from __future__ import annotations

import torch

from autoregembed_fast.method.data import Tokenization, compression_batch
from autoregembed_fast.method.model import AutoRegEmbed
from autoregembed_fast.method.scoring import memory_for_decoder, score_targets

SOURCES = ("own", "other", "none")


def other_index(n: int) -> torch.Tensor:
    """The text whose memory stands in for text i: the one half the list away (a list of sorted
    sentences has neighbours sharing their first words)."""
    return (torch.arange(n) + n // 2) % n


@torch.no_grad()
def encoder_memory(model: AutoRegEmbed, rows, batch_size: int = 16) -> torch.Tensor:
    """Memory [n, k, d] of each row's context + instruction (stage-1 rows), in row order."""
    settings = Tokenization()
    device = model.compress_ids.device
    parts = []
    for start in range(0, len(rows), batch_size):
        batch = compression_batch(model.tokenizer, rows[start : start + batch_size], settings)
        parts.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return torch.cat(parts)


@torch.no_grad()
def per_text_nll(decoder, tokenizer, memory: torch.Tensor, rows, batch_size: int = 16,
                 bos_id: int | None = None):
    """(NLL sums [3, n] for own / other / none, token counts [n]) of regenerating each row's output
    + [eos]; memory [n, k, d] holds row i's memory at i, read after the embedding of `bos_id` when
    given (`memory_for_decoder`). "none" reads "<bos> output" alone."""
    if memory.dim() != 3 or memory.shape[0] != len(rows):
        raise ValueError(f"memory must have shape [{len(rows)}, k, d] (one per row), got "
                         f"{tuple(memory.shape)}")
    if len(rows) < 2:
        raise ValueError("reconstruction needs at least 2 texts (the 'other' memory is another text's)")
    settings = Tokenization()
    device = memory.device
    bos = decoder.get_input_embeddings().weight[tokenizer.bos_token_id].to(memory.dtype)
    others = other_index(len(rows)).to(device)
    memory = memory_for_decoder(decoder, memory, bos_id)
    sums = torch.zeros(len(SOURCES), len(rows), dtype=torch.float64)
    counts = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        batch = compression_batch(tokenizer, rows[start : start + batch_size], settings)
        targets, mask = batch["target_ids"].to(device), batch["target_mask"].to(device)
        own = torch.arange(start, start + targets.shape[0], device=device)
        sources = {"own": (memory, own), "other": (memory, others[own]),
                   "none": (bos[None, None, :], torch.zeros_like(own))}
        for s, name in enumerate(SOURCES):
            memories, index = sources[name]
            scores = score_targets(decoder, memories, targets, mask, index)
            sums[s, own.cpu()] = -scores.double().cpu()
        counts[start : start + targets.shape[0]] = mask.sum(dim=1).double().cpu()
    return sums, counts


def summarise(sums: torch.Tensor, counts: torch.Tensor, samples: int = 1000, seed: int = 0) -> dict:
    """Per-token NLL of each source (total NLL / total tokens), the gaps other - own and none - own,
    each with a 95 % percentile-bootstrap interval over texts (paired: one resample for all)."""
    def statistics(index):
        nll = sums[:, index].sum(dim=1) / counts[index].sum()
        return torch.cat([nll, nll[1:] - nll[0]])

    names = [*SOURCES, "other_minus_own", "none_minus_own"]
    point = statistics(torch.arange(len(counts)))
    result = {name: float(value) for name, value in zip(names, point)}
    if samples:
        generator = torch.Generator().manual_seed(seed)
        draws = torch.stack([statistics(torch.randint(0, len(counts), (len(counts),),
                                                      generator=generator))
                             for _ in range(samples)])
        low, high = draws.quantile(0.025, dim=0), draws.quantile(0.975, dim=0)
        for name, lo, hi in zip(names, low, high):
            result[f"{name}_ci95"] = [float(lo), float(hi)]
    result["texts"], result["tokens"] = len(counts), int(counts.sum())
    return result


def reconstruction_nlls(model: AutoRegEmbed, decoder, rows, batch_size: int = 16,
                        samples: int = 1000) -> dict:
    """Own / other / none NLL (nats per token) of an encoder's memory, with intervals: `summarise`."""
    memory = encoder_memory(model, rows, batch_size)
    return summarise(*per_text_nll(decoder, model.tokenizer, memory, rows, batch_size,
                                   model.decoder_bos_id), samples)
