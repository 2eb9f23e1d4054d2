"""Data files: every bad row is reported with its file and line before training; tokenisation and
batches follow the released recipe."""

import json

import pytest
import torch

from autoregembed_fast.method.data import (
    ALIGNMENT_FIELDS,
    COMPRESSION_FIELDS,
    FIXED_INSTRUCTION,
    DataError,
    Tokenization,
    alignment_batch,
    encoder_ids,
    read_alignment_rows,
    read_jsonl,
    split_alignment_scores,
    target_ids,
)
from tiny_models import stage2_rows, tiny_tokenizer, write_jsonl

GOOD = {"context": "a man", "instruction": "repeat", "output": "a man"}


@pytest.mark.parametrize("line,message", [
    ('{"context": "a", "instruction": "b"}', "missing field 'output'"),
    ('{"context": "a", "instruction": "b", "output": 3}', "field 'output' must be str, got int"),
    ('{"context": "  ", "instruction": "b", "output": "c"}', "field 'context' is empty"),
    ('{"context": "a", "instruction": "b", "output": "c"', "not valid JSON"),
    ('["context"]', "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "stage1.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"stage1.jsonl:4: {message}"):
        read_jsonl(path, COMPRESSION_FIELDS)


def test_negative_lists_are_checked(tmp_path):
    rows = stage2_rows(3)
    rows[1]["neg"] = ["fine", ""]
    with pytest.raises(DataError, match=r":2: field 'neg' is empty"):
        read_jsonl(write_jsonl(tmp_path / "s2.jsonl", rows), ALIGNMENT_FIELDS)
    rows[1]["neg"] = []
    with pytest.raises(DataError, match=r":2: field 'neg' is an empty list"):
        read_jsonl(write_jsonl(tmp_path / "s2.jsonl", rows), ALIGNMENT_FIELDS)
    rows[1]["neg"] = ["one", "two"]
    with pytest.raises(DataError, match="different numbers of negatives"):
        read_alignment_rows(write_jsonl(tmp_path / "s2.jsonl", rows))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl", COMPRESSION_FIELDS)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl", COMPRESSION_FIELDS)


def test_recipe_tokenisation():
    tokenizer = tiny_tokenizer()
    settings = Tokenization()
    ids = encoder_ids(tokenizer, "a man plays", FIXED_INSTRUCTION, settings)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == "a man plays\n" + FIXED_INSTRUCTION + "\n"
    target = target_ids(tokenizer, "a dog runs", settings)
    assert target[-1] == tokenizer.eos_token_id and tokenizer.decode(target[:-1]) == "a dog runs"
    short = Tokenization(max_text_tokens=2)
    assert len(target_ids(tokenizer, "a dog runs quickly", short)) == 3


def test_alignment_batch_shares_the_query_memory():
    tokenizer = tiny_tokenizer()
    rows = stage2_rows(3, n_negatives=2)
    batch = alignment_batch(tokenizer, rows, Tokenization())
    assert batch["input_ids"].shape[0] == 6  # 3 queries then 3 positives, one encoder pass
    assert batch["memory_index"].tolist() == [0, 3, 0, 0, 1, 4, 1, 1, 2, 5, 2, 2]
    decoded = [tokenizer.decode(ids[mask.bool()]) for ids, mask in
               zip(batch["target_ids"], batch["target_mask"])]
    assert decoded[0] == decoded[1] == rows[0]["pos"] + "</s>"
    assert decoded[2:4] == [neg + "</s>" for neg in rows[0]["neg"]]
    s_qp, s_pp, s_qn = split_alignment_scores(torch.arange(12.0), 3, 2)
    assert s_qp.tolist() == [0, 4, 8] and s_pp.tolist() == [1, 5, 9]
    assert s_qn.tolist() == [[2, 3], [6, 7], [10, 11]]


def test_alignment_batch_without_self_score_encodes_only_the_queries():
    tokenizer = tiny_tokenizer()
    rows = stage2_rows(3, n_negatives=2)
    batch = alignment_batch(tokenizer, rows, Tokenization(), self_score=False)
    full = alignment_batch(tokenizer, rows, Tokenization())
    assert torch.equal(batch["input_ids"], full["input_ids"][:3, : batch["input_ids"].shape[1]])
    assert batch["memory_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    kept = [0, 2, 3, 4, 6, 7, 8, 10, 11]  # every target but pos | M_pos
    width = batch["target_ids"].shape[1]
    assert torch.equal(batch["target_ids"], full["target_ids"][kept, :width])
    s_qp, s_pp, s_qn = split_alignment_scores(torch.arange(9.0), 3, 2, self_score=False)
    assert s_pp is None and s_qp.tolist() == [0, 3, 6]
    assert s_qn.tolist() == [[1, 2], [4, 5], [7, 8]]




def test_in_batch_negatives_follow_each_querys_own_negatives():
    tokenizer = tiny_tokenizer()
    rows = stage2_rows(3, n_negatives=1)
    batch = alignment_batch(tokenizer, rows, Tokenization(), in_batch_negatives=True)
    assert batch["n_negatives"] == 3  # its own negative, then the 2 other rows' positives
    # Per query: pos | M_q, pos | M_p, neg | M_q, then pos_j | M_q for j != i.
    assert batch["memory_index"].tolist() == [0, 3, 0, 0, 0, 1, 4, 1, 1, 1, 2, 5, 2, 2, 2]
    decoded = [tokenizer.decode(ids[mask.bool()]) for ids, mask in
               zip(batch["target_ids"], batch["target_mask"])]
    expected = []
    for i, row in enumerate(rows):
        others = [rows[j]["pos"] for j in range(3) if j != i]
        expected += [row["pos"], row["pos"], row["neg"], *others]
    assert decoded == [text + "</s>" for text in expected]
    single = alignment_batch(tokenizer, rows[:1], Tokenization(), in_batch_negatives=True)
    assert single["n_negatives"] == 1  # a batch of one has no other positives


@pytest.mark.parametrize("with_positives", [False, True])
def test_in_batch_hard_negatives_follow_the_other_rows_positives(with_positives):
    tokenizer = tiny_tokenizer()
    rows = stage2_rows(3, n_negatives=2)
    batch = alignment_batch(tokenizer, rows, Tokenization(), in_batch_negatives=with_positives,
                            in_batch_hard_negatives=True)
    # Its own 2 negatives, (the 2 other rows' positives,) the 2 other rows' 2 negatives each.
    n = 2 + (2 if with_positives else 0) + 4
    assert batch["n_negatives"] == n
    assert batch["memory_index"].tolist() == [m for i in range(3) for m in [i, 3 + i] + [i] * n]
    decoded = [tokenizer.decode(ids[mask.bool()]) for ids, mask in
               zip(batch["target_ids"], batch["target_mask"])]
    expected = []
    for i, row in enumerate(rows):
        others = [rows[j] for j in range(3) if j != i]
        expected += [row["pos"], row["pos"], *row["neg"]]
        expected += [other["pos"] for other in others] if with_positives else []
        expected += [negative for other in others for negative in other["neg"]]
    assert decoded == [text + "</s>" for text in expected]
    s_qp, s_pp, s_qn = split_alignment_scores(torch.arange(3.0 * (2 + n)), 3, n)
    assert s_qn.shape == (3, n) and s_qp.tolist() == [0, 2 + n, 4 + 2 * n]
