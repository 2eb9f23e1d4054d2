"""The demo stands alone: its data ships with the repository, and nothing reads outside it."""

import hashlib
import re
from pathlib import Path

import pytest

from autoregembed_fast.method import demo, evaluate
from autoregembed_fast.method.data import ALIGNMENT_FIELDS, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_default_data_ships_inside_the_repository():
    path = Path(demo.DEFAULT_DATA).resolve()
    assert path.is_relative_to(ROOT)
    rows = read_jsonl(path, ALIGNMENT_FIELDS)  # validates every row
    assert len(rows) == 800
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in (ROOT / "examples" / "data" / "README.md").read_text()


def test_no_code_reads_outside_the_repository():
    """Our team folder beside the checkout is not part of the product: a clone has no such folder."""
    sources = [ROOT / "Makefile", ROOT / "setup.py"] + [
        path for folder in ("autoregembed_fast", "kernels", "bench", "tests", "csrc", ".ci")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix != ".pyc" and path != Path(__file__).resolve()]
    # The team folder as a relative path, or its name as a path component joined in code.
    reads_team_folder = re.compile(r"\.\./shared|[\"']shared[\"']")
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if reads_team_folder.search(p.read_text(errors="replace"))]
    assert offenders == []


def test_the_whole_demo_pipeline_runs_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    """Every step of the demo (split, baselines, stage 1 with its levers, reconstruction NLL,
    references, stage 2 with accumulation, contrastive, evaluation, plot) on a tiny base model;
    the choice of bf16 is printed and recorded; the seed reaches every training."""
    import json

    commands = []
    run_command = demo.train.main
    monkeypatch.setattr(demo.train, "main", lambda argv: (commands.append(argv), run_command(argv)))

    from tiny_models import save_tiny_base, stage2_rows, write_jsonl

    base = save_tiny_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "triplets.jsonl", stage2_rows(30))
    generator = __import__("random").Random(0)
    words = ["a", "man", "dog", "runs", "plays", "two", "the", "cat"]
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(
        f"g\tf\t2012\t{i}\t{generator.uniform(0, 5):.2f}\t{' '.join(generator.choices(words, k=4))}"
        f"\t{' '.join(generator.choices(words, k=5))}\n" for i in range(30)))
    out = tmp_path / "out"
    results = demo.main(["--model", str(base), "--data", str(data), "--output", str(out),
                         "--heldout", "10", "--sts-b", str(sts), "--batch-size", "4",
                         "--stage1-steps", "2", "--stage1-bos-before-memory",
                         "--stage1-memory-layer", "1",
                         "--stage1-compress-token-lr", "1e-3", "--stage1-lr-schedule", "constant",
                         "--stage1-memory-norm", "none", "--stage2-steps", "2",
                         "--stage2-grad-accum", "2", "--stage2-in-batch-negatives",
                         "--stage2-lr-schedule", "constant", "--stage2-alignment-weight", "0.5",
                         "--average-logprobs", "--bf16", "off",
                         "--contrastive-batch-size", "5", "--seed", "3"])
    trainings = [argv for argv in commands if argv[0] in ("compress", "align")]
    assert len(trainings) == 3
    # The reference scores are of the log-prob form stage 2 trains on.
    reference, stage2 = [argv for argv in commands
                         if argv[0] == "reference" or "--reference-scores" in argv]
    assert "--average-logprobs" in reference and "--average-logprobs" in stage2
    assert stage2[stage2.index("--lr-schedule") + 1] == "constant"
    assert stage2[stage2.index("--alignment-weight") + 1] == "0.5"
    assert all(argv[argv.index("--seed") + 1] == "3" for argv in trainings)
    assert "bf16 autocast off: --bf16 off" in capsys.readouterr().out
    assert results["bf16"] == {"on": False, "why": "--bf16 off"}
    assert set(results["models"]) == {"untrained last-token prompt", "autoregembed stage 1",
                                      "autoregembed stage 1 + 2", "contrastive (InfoNCE)"}
    for metrics in results["models"].values():
        assert metrics["triplets"] == 10 and metrics["sts_b_spearman_pairs"] == 30
    # Each trained model's row is that model on the held-out split (not another model, not the
    # training rows).
    for name, directory in (("autoregembed stage 1", "stage1"), ("autoregembed stage 1 + 2", "stage2"),
                            ("contrastive (InfoNCE)", "contrastive")):
        alone = evaluate.main(["--encoder", str(out / directory / "model"), "--triplets",
                               str(out / "heldout.jsonl"), "--sts-b", str(sts)])
        for metric in ("triplet_accuracy", "sts_b_spearman"):
            assert results["models"][name][metric] == alone[metric]
    for nll in results["reconstruction_nll"].values():
        assert nll["texts"] == 30 and nll["own_ci95"][0] <= nll["own"] <= nll["own_ci95"][1]
    from autoregembed_fast.method.model import AutoRegEmbed

    trained = AutoRegEmbed.from_pretrained(out / "stage2" / "model")
    assert trained.bos_before_memory and trained.memory_layer == 1
    # The contrastive baseline embeds the same way: stage 1's memory settings.
    assert AutoRegEmbed.from_pretrained(out / "contrastive" / "model").settings == trained.settings
    contrastive_steps = [json.loads(line)["step"] for line in
                         (out / "contrastive" / "log.jsonl").read_text().splitlines()]
    # At least the rows of both stages (4 x (2 + 2 x 2) = 24) in steps of 5: 5 steps.
    assert contrastive_steps[-1] == 5 and results["contrastive_steps_x_batch"] == [5, 5]
    wall = results["wall_s"]
    assert set(wall) == ({"base model conversion", "stage1", "reference", "stage2", "contrastive",
                          "total"}
                         | {f"evaluation: {name}" for name in results["models"]}
                         | {f"reconstruction NLL: {name}" for name in results["reconstruction_nll"]})
    # The parts run one after another within the whole run.
    assert sum(seconds for part, seconds in wall.items() if part != "total") <= wall["total"]
    assert json.loads((out / "results.json").read_text())["models"] == results["models"]
    assert (out / "results.png").stat().st_size > 1000


def test_the_contrastive_baseline_sees_at_least_the_rows_of_both_stages():
    """The demo's defaults: stages 1 + 2 see 8 x (250 + 75) = 2,600 rows, the baseline 325 steps x 8;
    in steps of 32, 82 steps (2,624: 81 would be 2,592, fewer)."""
    args = demo.parse_args([])
    assert (args.batch_size, args.stage1_steps, args.stage2_steps) == (8, 250, 75)
    assert demo.contrastive_steps(args) == 325
    assert demo.contrastive_steps(demo.parse_args(["--contrastive-batch-size", "32"])) == 82
    for bad in ("0", "-8", "eight"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--contrastive-batch-size", bad])


def test_the_makefile_demo_targets_parse():
    """`make demo` and `make demo-long` pass settings the demo accepts (a typo would surface only
    after an hour of stage 1)."""
    import shlex

    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    commands = re.findall(r"-m autoregembed_fast\.demo (.*)", makefile)
    assert len(commands) == 2
    parsed = [demo.parse_args(shlex.split(command)) for command in commands]
    assert parsed[1].stage1_steps > parsed[0].stage1_steps
    assert parsed[0].stage1_memory_layer == 15 and parsed[1].stage1_memory_layer is None
    assert not parsed[0].stage1_bos_before_memory and not parsed[1].stage1_bos_before_memory
    assert parsed[1].output != parsed[0].output
