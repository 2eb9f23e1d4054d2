"""The stage-2 reference scores cache: r+ and r- of every row under the frozen stage-1 model, keyed by
what they depend on so that `align` refuses a cache made from other data, model or settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from autoregembed_fast.method.data import Tokenization, negatives_of


def file_digest(path: Path, hasher) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(block)


def reference_key(data: Path, model_dir: Path, settings: Tokenization, average: bool) -> str:
    """Hash of everything the reference scores depend on: the data file, the stage-1 model's files
    and the tokenisation settings."""
    hasher = hashlib.sha256()
    file_digest(data, hasher)
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        hasher.update(path.name.encode())
        file_digest(path, hasher)
    hasher.update(json.dumps({**settings.as_dict(), "average": average}, sort_keys=True).encode())
    return hasher.hexdigest()


class References:
    """Cached r+ [R] and r- [R, n] of every stage-2 row (zeros with `--reference-scores none`)."""

    def __init__(self, rows, positive, negative):
        self.rows, self.positive, self.negative = rows, positive, negative

    def of(self, rows, device):
        index = torch.tensor(rows)
        return self.positive[index].to(device), self.negative[index].to(device)

    @classmethod
    def load(cls, rows, path: str, key: str | None):
        n_negatives = len(negatives_of(rows[0]))
        if path == "none":
            return cls(rows, torch.zeros(len(rows)), torch.zeros(len(rows), n_negatives))
        cache = torch.load(path, map_location="cpu")
        if cache.get("key") != key:
            raise SystemExit(
                f"reference scores {path} do not match this data, reference model and tokenisation "
                f"(cache key {str(cache.get('key'))[:12]}..., expected {str(key)[:12]}...): rerun "
                "`python -m autoregembed_fast.train reference` with the same --data, --encoder and "
                "settings, or pass --reference-scores none"
            )
        return cls(rows, cache["positive"], cache["negative"])
