"""bench.method.stage2_study's bookkeeping: settings, log summaries and the table (its training and
measurements are the package's own commands, tested where they live)."""

import json

from bench.method import stage2_study


def test_every_setting_is_a_valid_align_command():
    from autoregembed_fast.method.training.commands import parse_args

    for name, flags in stage2_study.SETTINGS.items():
        args = parse_args(["align", "--encoder", "E", "--decoder", "D", "--data", "x.jsonl",
                           "--output", "o", *flags])
        assert args.command == "align", name
    assert stage2_study.flag_value(["--lr", "2e-5", "--beta", "1.0"], "--beta") == "1.0"
    assert stage2_study.flag_value(["--lr", "2e-5"], "--beta", 0.1) == 0.1


def test_by_tenths_averages_consecutive_tenths():
    records = [{"loss": float(i)} for i in range(20)] + [{"other": 1.0}]
    assert stage2_study.by_tenths(records, "loss") == [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5,
                                                        16.5, 18.5]


def test_table_gives_each_setting_its_mean_over_seeds(tmp_path, capsys):
    metrics = {"triplet_accuracy": 0.8, "triplet_accuracy_ci95": [0.75, 0.85], "sts_b_spearman": 60.0,
               "sts_b_spearman_ci95": [57.0, 63.0]}
    (tmp_path / "study.json").write_text(json.dumps({"stage1_metrics": metrics}))

    def record(seed, triplets, sts):
        return {"setting": "demo", "seed": seed, "triplet_accuracy": triplets, "sts_b_spearman": sts,
                "cosine_to_stage1": {"mean": 0.99}, "heldout_before": {"loss": 2.0},
                "heldout_after": {"loss": 1.0, "pos_over_neg": 0.5},
                "s1_saturated_by_tenths": [0.0], "s2_saturated_by_tenths": [0.5], "train_wall_s": 10.0}

    (tmp_path / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in (record(1, 0.9, 70.0), record(0, 0.7, 64.0))))
    stage2_study.table(type("Args", (), {"study": str(tmp_path)}))
    out = capsys.readouterr().out
    assert "stage 1: triplets 0.800 [0.750, 0.850], STS-B dev 60.0 [57.0, 63.0]" in out
    assert "| demo | 2 | 0.800 (0.700 / 0.900) | 67.0 (64.0 / 70.0) |" in out
