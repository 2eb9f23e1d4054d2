"""The training loop end to end on a tiny model: the three commands, resume, reference-cache checks,
the contrastive baseline, and data-parallel runs against a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoregembed_fast.method.training import commands as train
from autoregembed_fast.method.training.loop import lr_factor
from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings
from tiny_models import save_tiny_base, stage1_rows, stage2_rows, write_jsonl

# The runs below test the loop's mechanics on a cosine schedule: the default, the released runs'
# warmup-decay, spends its first 2 steps at rate 0 (test_warmup_decay_is_deepspeeds_schedule).
COSINE = ["--lr-schedule", "cosine"]

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_base(root / "base")
    stage1 = write_jsonl(root / "stage1.jsonl", stage1_rows(16))
    stage2 = write_jsonl(root / "stage2.jsonl", stage2_rows(12))
    train.main(["compress", *COSINE, "--model", str(base), "--data", str(stage1), "--output",
                str(root / "stage1"), "--batch-size", "4", "--steps", "3", "--lr", "1e-3"])
    return {"root": root, "base": base, "stage1": stage1, "stage2": stage2,
            "encoder": root / "stage1" / "model"}


def losses(directory):
    return [json.loads(line)["loss"] for line in (Path(directory) / "log.jsonl").read_text().splitlines()]


def test_compress_writes_model_log_and_curve(workspace):
    """The first logged loss is the mean token cross-entropy of the first batch under the model as
    built (same seed, same rows): recomputed here with the objective, in the same order of RNG draws
    (the compress-token embeddings are drawn when they are added)."""
    import copy

    from autoregembed_fast.method.data import COMPRESSION_FIELDS, Tokenization, read_jsonl
    from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm
    from autoregembed_fast.method.training.checkpoint import seed_everything
    from autoregembed_fast.method.training.cluster import Cluster, epoch_batches
    from autoregembed_fast.method.training.objectives import CompressionObjective

    out = workspace["root"] / "stage1"
    logged = losses(out)
    assert len(logged) == 3
    seed_everything(0)
    rows = read_jsonl(workspace["stage1"], COMPRESSION_FIELDS)
    base, tokenizer = load_causal_lm(str(workspace["base"]))
    decoder = frozen_decoder(copy.deepcopy(base))
    start = AutoRegEmbed.from_base(base, tokenizer, MemorySettings(k=5))
    first = epoch_batches(len(rows), 4, 0, 0, Cluster(0, 1, torch.device("cpu")))[0]
    with torch.no_grad():
        loss, count = CompressionObjective(decoder, tokenizer, Tokenization(), rows)(
            start, first, torch.device("cpu"))
    assert logged[0] == pytest.approx(loss.item() / count, rel=1e-5)
    assert logged[-1] != logged[0]
    assert (out / "loss.png").stat().st_size > 1000
    model = AutoRegEmbed.from_pretrained(out / "model")
    assert model.k == 5
    embeddings = model.encode(["a man plays", "two dogs run"])
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)


def trained_weights(directory) -> torch.Tensor:
    """Every parameter of the model a run saved, flattened into one fp32 vector."""
    model = AutoRegEmbed.from_pretrained(Path(directory) / "model")
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def compress_args(workspace, output, *extra):
    return ["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
            "--output", str(output), "--batch-size", "2", "--grad-accum", "2", "--steps", "6",
            "--lr", "1e-3", "--save-every", "2", *extra]


def test_resume_continues_with_identical_losses(workspace, tmp_path):
    train.main(compress_args(workspace, tmp_path / "straight"))
    # A run killed after step 3 (its last checkpoint is step 2), then resumed.
    train.main(compress_args(workspace, tmp_path / "killed", "--stop-after", "3"))
    assert not (tmp_path / "killed" / "model").exists()
    assert len(losses(tmp_path / "killed")) == 3
    train.main(compress_args(workspace, tmp_path / "killed", "--resume"))
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_reference_then_align(workspace, tmp_path):
    scores = tmp_path / "reference.pt"
    train.main(["reference", "--encoder", str(workspace["encoder"]), "--decoder",
                str(workspace["base"]), "--data", str(workspace["stage2"]), "--output", str(scores),
                "--batch-size", "5"])
    cache = torch.load(scores)
    assert cache["positive"].shape == (12,) and cache["negative"].shape == (12, 1)
    # Each score against the row's query encoded alone and its target scored alone (no batching).
    from autoregembed_fast import score_targets
    from autoregembed_fast.method.data import Tokenization, encoder_ids, instruction_for, read_alignment_rows
    from autoregembed_fast.method.data import target_ids as target_ids_of
    from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm

    model = AutoRegEmbed.from_pretrained(workspace["encoder"]).eval()
    decoder = frozen_decoder(load_causal_lm(str(workspace["base"]))[0])
    settings = Tokenization()
    for i, row in enumerate(read_alignment_rows(workspace["stage2"])[:3]):
        ids = torch.tensor([encoder_ids(model.tokenizer, row["query"], instruction_for(row, settings),
                                        settings)])
        with torch.no_grad():
            memory = model(ids, torch.ones_like(ids))
            for target, cached in ((row["pos"], cache["positive"][i]), (row["neg"], cache["negative"][i, 0])):
                target = target if isinstance(target, str) else target[0]
                tokens = torch.tensor([target_ids_of(model.tokenizer, target, settings)])
                alone = score_targets(decoder, memory, tokens, torch.ones_like(tokens), torch.tensor([0]))
                assert torch.allclose(cached, alone[0], rtol=1e-5, atol=1e-5)
    train.main(["align", *COSINE, "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
                "--data", str(workspace["stage2"]), "--reference-scores", str(scores), "--output",
                str(tmp_path / "stage2"), "--batch-size", "4", "--steps", "2", "--lr", "1e-4"])
    assert len(losses(tmp_path / "stage2")) == 2
    assert (tmp_path / "stage2" / "model" / "autoregembed.json").is_file()


def test_reference_scores_under_bf16_autocast(workspace, tmp_path):
    """`reference --bf16` scores under autocast, as the --bf16 training that reads them: not the
    fp32 scores (the flag takes effect), but within bf16's rounding of them (operands round at
    2^-8; a few layers compound it to a few %)."""
    common = ["reference", "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
              "--data", str(workspace["stage2"]), "--batch-size", "5"]
    train.main(common + ["--output", str(tmp_path / "fp32.pt")])
    train.main(common + ["--output", str(tmp_path / "bf16.pt"), "--bf16"])
    fp32, bf16 = torch.load(tmp_path / "fp32.pt"), torch.load(tmp_path / "bf16.pt")
    for name in ("positive", "negative"):
        assert not torch.equal(fp32[name], bf16[name])
        assert torch.allclose(bf16[name], fp32[name], rtol=5e-2, atol=0)


@pytest.mark.parametrize("stage", ["compress", "align"])
def test_padded_runs_follow_the_packed_trajectory(workspace, tmp_path, stage):
    """--no-packing (right-padded encoder and decoder batches, for models the packing probe refuses)
    trains the same model: equal losses step by step."""
    common = stage_args(workspace, stage) + ["--steps", "3", "--lr", "1e-3", "--batch-size", "4"]
    train.main(common + ["--output", str(tmp_path / "packed")])
    train.main(common + ["--output", str(tmp_path / "padded"), "--no-packing"])
    packed, padded = losses(tmp_path / "packed"), losses(tmp_path / "padded")
    assert len(padded) == 3 and max(abs(a - b) for a, b in zip(packed, padded)) <= 1e-5 * max(packed)


def test_reference_model_names_where_the_cached_scores_came_from(workspace, tmp_path):
    """Stage 2 may start from another encoder than the one that scored the references: the cache's
    key is then checked against --reference-model, and refused without it."""
    scores = tmp_path / "reference.pt"
    train.main(["reference", "--encoder", str(workspace["encoder"]), "--decoder",
                str(workspace["base"]), "--data", str(workspace["stage2"]), "--output", str(scores)])
    other = tmp_path / "other-encoder"
    AutoRegEmbed.from_pretrained(workspace["encoder"]).save_pretrained(other)
    (other / "note.txt").write_text("a different model directory")  # a different cache key
    common = ["align", *COSINE, "--encoder", str(other), "--decoder", str(workspace["base"]), "--data",
              str(workspace["stage2"]), "--reference-scores", str(scores), "--batch-size", "4",
              "--steps", "1", "--lr", "1e-4"]
    with pytest.raises(SystemExit, match="reference"):
        train.main(common + ["--output", str(tmp_path / "refused")])
    train.main(common + ["--output", str(tmp_path / "ok"), "--reference-model", str(workspace["encoder"])])
    assert len(losses(tmp_path / "ok")) == 1


def test_align_refuses_a_cache_from_other_data(workspace, tmp_path):
    scores = tmp_path / "reference.pt"
    other = write_jsonl(tmp_path / "other.jsonl", stage2_rows(12, seed=7))
    train.main(["reference", "--encoder", str(workspace["encoder"]), "--decoder",
                str(workspace["base"]), "--data", str(other), "--output", str(scores)])
    with pytest.raises(SystemExit, match="do not match this data"):
        train.main(["align", "--encoder", str(workspace["encoder"]), "--decoder",
                    str(workspace["base"]), "--data", str(workspace["stage2"]), "--reference-scores",
                    str(scores), "--output", str(tmp_path / "stage2"), "--steps", "1"])


def test_contrastive_baseline_trains(workspace, tmp_path):
    train.main(["align", *COSINE, "--objective", "contrastive", "--encoder", str(workspace["base"]), "--data",
                str(workspace["stage2"]), "--output", str(tmp_path / "contrastive"), "--batch-size",
                "4", "--steps", "3", "--lr", "1e-3"])
    assert len(losses(tmp_path / "contrastive")) == 3
    assert AutoRegEmbed.from_pretrained(tmp_path / "contrastive" / "model").settings == MemorySettings()


def test_align_makes_an_encoder_from_a_base_model_with_the_memory_settings_given(workspace, tmp_path):
    """The contrastive baseline embeds the way a stage-1 model with these settings does."""
    train.main(["align", *COSINE, "--objective", "contrastive", "--encoder", str(workspace["base"]), "--data",
                str(workspace["stage2"]), "--output", str(tmp_path / "contrastive"), "--batch-size",
                "4", "--steps", "1", "--memory-layer", "1", "--bos-before-memory"])
    saved = AutoRegEmbed.from_pretrained(tmp_path / "contrastive" / "model")
    assert saved.settings == MemorySettings(memory_layer=1, bos_before_memory=True)


@pytest.mark.parametrize("flag, named", [(["--memory-layer", "last"], "--memory-layer"),
                                         (["--no-bos-before-memory"], "--bos-before-memory")])
def test_align_refuses_memory_settings_for_a_saved_model(workspace, tmp_path, flag, named, capsys):
    """A saved AutoRegEmbed keeps what it was trained with: a flag that would change it is an error,
    even one that names the released default."""
    with pytest.raises(SystemExit):
        train.main(["align", "--encoder", str(workspace["encoder"]), "--decoder",
                    str(workspace["base"]), "--data", str(workspace["stage2"]), "--output",
                    str(tmp_path / "stage2"), *flag])
    error = capsys.readouterr().err
    assert named in error and "saved AutoRegEmbed" in error
    assert not (tmp_path / "stage2").exists()


def test_bad_data_fails_before_training(workspace, tmp_path):
    rows = stage1_rows(6)
    rows[4]["output"] = ""
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad.jsonl:5: field 'output' is empty"):
        train.main(["compress", "--model", str(workspace["base"]), "--data", str(bad), "--output",
                    str(tmp_path / "out"), "--steps", "1"])
    assert not (tmp_path / "out").exists()


def run_torchrun(args, processes):
    # --standalone: a free port for each run (a fixed port can still be held by the previous run).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), "-m", "autoregembed_fast.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]


# The two-process comparisons' runs: the flags, and the bound on trained weights, come from these.
COMPARED_STEPS, COMPARED_LR = 3, 1e-3
COMPARED_RUN = ["--steps", str(COMPARED_STEPS), "--lr", str(COMPARED_LR)]


def assert_same_trained_weights(one, two, steps: int = COMPARED_STEPS, lr: float = COMPARED_LR):
    """The encoders saved by two runs agree to rtol 1e-4 / atol 1e-6, but for at most 1 element in
    1,000 of a tensor: Adam divides each gradient by its own running size, so an element whose
    gradient is at the level of the reduction order's rounding (2 ranks sum halves, 1 process sums
    all rows) can step differently, by at most lr (1 - beta1) / sqrt(1 - beta2) = 3.17 lr a step
    (Adam's bound, defaults 0.9 / 0.999) in each run. A reduction that is wrong moves most elements."""
    single = AutoRegEmbed.from_pretrained(one / "model").encoder.state_dict()
    sharded = AutoRegEmbed.from_pretrained(two / "model").encoder.state_dict()
    assert single.keys() == sharded.keys()
    for name, value in single.items():
        close = torch.isclose(value, sharded[name], rtol=1e-4, atol=1e-6)
        assert (~close).sum() <= value.numel() // 1000, name
        assert (value - sharded[name]).abs().max() <= 2 * steps * 3.17 * lr, name


def stage_args(workspace, stage):
    if stage == "compress":
        return ["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"])]
    return ["align", *COSINE, "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
            "--data", str(workspace["stage2"])]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp-lora"])
@pytest.mark.parametrize("stage", ["compress", "align"])
def test_two_processes_match_one(workspace, tmp_path, stage, parallel):
    """2 ranks x batch 2 (gloo; DDP, or FSDP2 sharding the encoder; DDP training LoRA adapters)
    give the loss trajectory of 1 process x batch 4, and the saved model loads in one process."""
    common = stage_args(workspace, stage) + COMPARED_RUN
    if parallel == "ddp-lora":
        common += ["--lora", "4"]
    sharding = ["--fsdp"] if parallel == "fsdp" else []
    run_torchrun(common + ["--output", str(tmp_path / "one"), "--batch-size", "4"], 1)
    run_torchrun(common + ["--output", str(tmp_path / "two"), "--batch-size", "2", *sharding], 2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == COMPARED_STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    assert_same_trained_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["compress", "align"])
def test_fsdp_with_gradient_checkpointing_matches_one_plain_process(workspace, tmp_path, stage):
    """Activation checkpointing inside FSDP2 units recomputes each layer in the backward (with its
    parameters all-gathered again): the trajectory and the trained weights stay those of one
    process without checkpointing."""
    common = stage_args(workspace, stage) + COMPARED_RUN
    run_torchrun(common + ["--output", str(tmp_path / "one"), "--batch-size", "4"], 1)
    run_torchrun(common + ["--output", str(tmp_path / "two"), "--batch-size", "2", "--fsdp",
                           "--gradient-checkpointing"], 2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == COMPARED_STEPS and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    assert_same_trained_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_fsdp_with_texts_of_very_different_lengths(workspace, tmp_path):
    """Texts of 1 word and of 50-70 words on the same ranks: if the number of encoder passes
    depended on the lengths, the ranks would make different numbers of FSDP2 all-gathers and hang.
    Each call is one packed pass whatever the lengths; the trajectory matches one process."""
    rows = stage2_rows(8)
    for i, row in enumerate(rows):  # 1 word or 50-70 words
        row["query"] = row["query"].split()[0] if i % 2 else " ".join([row["query"]] * 12)
        row["pos"] = row["pos"].split()[0] if i % 4 else " ".join([row["pos"]] * 6)
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    common = ["align", *COSINE, "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
              "--data", str(data), "--steps", "2", "--lr", "1e-3"]
    run_torchrun(common + ["--output", str(tmp_path / "one"), "--batch-size", "4"], 1)
    run_torchrun(common + ["--output", str(tmp_path / "two"), "--batch-size", "2", "--fsdp"], 2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 2 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5


@pytest.mark.slow
def test_fsdp_resume_gives_the_identical_next_step_loss(workspace, tmp_path):
    """Killed after step 3 (its last sharded checkpoint is step 2), then resumed under FSDP2."""
    common = stage_args(workspace, "compress") + ["--steps", "5", "--lr", "1e-3", "--batch-size", "2",
                                                  "--save-every", "2", "--fsdp"]
    run_torchrun(common + ["--output", str(tmp_path / "straight")], 2)
    run_torchrun(common + ["--output", str(tmp_path / "killed"), "--stop-after", "3"], 2)
    assert (tmp_path / "killed" / "checkpoint" / "loop.pt").is_file()
    run_torchrun(common + ["--output", str(tmp_path / "killed"), "--resume"], 2)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_fsdp_without_torchrun_is_refused(workspace, tmp_path):
    with pytest.raises(SystemExit, match="torchrun"):
        train.main(stage_args(workspace, "compress") + ["--output", str(tmp_path / "out"), "--steps",
                                                        "1", "--fsdp"])


@pytest.mark.slow
def test_reference_scores_sharded_over_two_ranks_match_one_process(workspace, tmp_path):
    """Each rank scores its shard (12 rows: 6 + 6, batch 4 so a shard ends mid-batch); rank 0
    writes the merged cache, equal to the single process's, with the same key."""
    common = ["reference", "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
              "--data", str(workspace["stage2"]), "--batch-size", "4"]
    run_torchrun(common + ["--output", str(tmp_path / "one.pt")], 1)
    run_torchrun(common + ["--output", str(tmp_path / "two.pt")], 2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["key"] == two["key"]
    assert one["positive"].shape == (12,) and one["negative"].shape == (12, 1)
    assert torch.allclose(one["positive"], two["positive"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(one["negative"], two["negative"], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_and_gradient_checkpointing_follow_the_fp32_run(workspace, tmp_path):
    train.main(compress_args(workspace, tmp_path / "fp32", "--save-every", "0"))
    train.main(compress_args(workspace, tmp_path / "bf16", "--bf16", "--gradient-checkpointing",
                             "--save-every", "0"))
    train.main(compress_args(workspace, tmp_path / "bf16-plain", "--bf16", "--save-every", "0"))
    train.main(compress_args(workspace, tmp_path / "start", "--lr", "0", "--save-every", "0"))
    reference, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(bf16) == 6
    # bf16 operands round at 2^-8: the trajectory stays within a few % of the fp32 one.
    assert bf16 == pytest.approx(reference, rel=5e-2)
    # And the bf16 run trains: its weights moved as the fp32 run's did (a run that does not train
    # stays at the start, as far from the fp32 weights as the whole fp32 update).
    start, fp32_weights, bf16_weights = (trained_weights(tmp_path / name)
                                          for name in ("start", "fp32", "bf16"))
    update = (fp32_weights - start).norm()
    assert update > 0
    assert (bf16_weights - fp32_weights).norm() < 0.25 * update
    # Checkpointing recomputes the same bf16 forward: the same losses.
    assert bf16 == pytest.approx(losses(tmp_path / "bf16-plain"), rel=1e-5)


@pytest.mark.parametrize("parallel", ["one-process", "fsdp"])
def test_a_bf16_checkpoint_trains_on_fp32_master_weights(workspace, tmp_path, parallel):
    """An update far below bf16's spacing must still move the weights: the encoder trains in fp32
    (and saves fp32) even when its checkpoint is bf16; with FSDP2, bf16 compute comes from its mixed
    precision policy over fp32 shards."""
    from autoregembed_fast.method.loading import load_causal_lm

    base, tokenizer = load_causal_lm(str(workspace["base"]))
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16-base")
    tokenizer.save_pretrained(tmp_path / "bf16-base")
    args = ["compress", *COSINE, "--model", str(tmp_path / "bf16-base"), "--data", str(workspace["stage1"]),
            "--output", str(tmp_path / "out"), "--batch-size", "2", "--steps", "1", "--lr", "1e-7",
            "--warmup-ratio", "0", "--bf16"]
    if parallel == "fsdp":
        run_torchrun(args + ["--fsdp"], 2)
    else:
        train.main(args)
    trained = AutoRegEmbed.from_pretrained(tmp_path / "out" / "model").encoder
    before = load_causal_lm(str(tmp_path / "bf16-base"))[0]
    weight = trained.model.layers[0].mlp.down_proj.weight
    start = before.model.layers[0].mlp.down_proj.weight.float()
    assert weight.dtype == torch.float32
    change = (weight - start).abs()
    spacing = start.abs() * 2.0**-8  # bf16's relative spacing
    assert change.max() > 0  # it moved ...
    assert (change < spacing / 4).float().mean() > 0.9  # ... by steps bf16 weights could not hold


def test_compress_with_memory_norm_keeps_it_through_save_and_load(workspace):
    out = workspace["root"] / "stage1-memory-norm"
    train.main(["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                "--output", str(out), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
                "--memory-norm", "embedding"])
    model = AutoRegEmbed.from_pretrained(out / "model")
    from autoregembed_fast.method.loading import load_causal_lm

    base = load_causal_lm(str(workspace["base"]))[0]
    expected = base.get_input_embeddings().weight.double().norm(dim=1).mean().item()
    assert abs(model.memory_norm - expected) <= 1e-6 * expected
    ids, mask = model.tokenize_texts(["a man plays", "two dogs run here"])
    with torch.no_grad():
        memory = model(ids, mask)
    assert torch.allclose(memory.norm(dim=-1), torch.full((2, 5), expected, dtype=torch.float32),
                          rtol=1e-5)


def test_bos_before_memory_is_a_setting_of_the_saved_model(workspace, tmp_path):
    """`compress --bos-before-memory` saves the layout with the model; its stage-1 loss is the
    decoder's own cross-entropy on [bos ; memory ; text], and `reference` reads the layout from the
    saved model (a cached score equals the target scored alone after bos + memory)."""
    from torch.nn import functional as F

    from autoregembed_fast import score_targets
    from autoregembed_fast.method.data import Tokenization, compression_batch, read_alignment_rows, read_jsonl
    from autoregembed_fast.method.data import COMPRESSION_FIELDS, encoder_ids, instruction_for, target_ids
    from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm
    from autoregembed_fast.method.scoring import memory_for_decoder
    from autoregembed_fast.method.training.objectives import CompressionObjective

    out = tmp_path / "stage1"
    train.main(["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                "--output", str(out), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
                "--bos-before-memory"])
    model = AutoRegEmbed.from_pretrained(out / "model").eval()
    assert model.bos_before_memory and model.decoder_bos_id == model.tokenizer.bos_token_id
    decoder = frozen_decoder(load_causal_lm(str(workspace["base"]))[0])
    embed = decoder.get_input_embeddings()

    rows = read_jsonl(workspace["stage1"], COMPRESSION_FIELDS)
    objective = CompressionObjective(decoder, model.tokenizer, Tokenization(), rows,
                                     model.decoder_bos_id)
    with torch.no_grad():
        loss, count = objective(model, [0, 1, 2], torch.device("cpu"))
        batch = compression_batch(model.tokenizer, rows[:3], Tokenization())
        memory = model(batch["input_ids"], batch["attention_mask"])
        expected = 0.0
        for i in range(3):
            target = batch["target_ids"][i][batch["target_mask"][i].bool()]
            inputs = torch.cat([embed.weight[model.tokenizer.bos_token_id][None], memory[i],
                                embed(target)])[None]
            logits = decoder(inputs_embeds=inputs).logits[0, model.k : -1]
            expected += F.cross_entropy(logits.double(), target, reduction="sum").item()
    assert count == int(batch["target_mask"].sum())
    assert abs(loss.item() - expected) <= 1e-5 * expected

    scores = tmp_path / "reference.pt"
    train.main(["reference", "--encoder", str(out / "model"), "--decoder", str(workspace["base"]),
                "--data", str(workspace["stage2"]), "--output", str(scores), "--batch-size", "5"])
    row = read_alignment_rows(workspace["stage2"])[0]
    settings = Tokenization()
    ids = torch.tensor([encoder_ids(model.tokenizer, row["query"], instruction_for(row, settings),
                                    settings)])
    tokens = torch.tensor([target_ids(model.tokenizer, row["pos"], settings)])
    with torch.no_grad():
        memory = model(ids, torch.ones_like(ids))
        alone = [score_targets(decoder, prefix, tokens, torch.ones_like(tokens), torch.tensor([0]))
                 for prefix in (memory_for_decoder(decoder, memory, model.decoder_bos_id), memory)]
    cached = torch.load(scores)["positive"][0]
    assert torch.allclose(cached, alone[0][0], rtol=1e-5, atol=1e-5)
    assert abs(cached - alone[1][0]) > 0.01  # without bos: a different score (the tiny model's gap)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "large"])
def test_compress_rejects_a_bad_memory_norm(workspace, bad, capsys):
    with pytest.raises(SystemExit):
        train.main(["compress", "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                    "--output", str(workspace["root"] / "unused"), "--memory-norm", bad])
    assert "--memory-norm" in capsys.readouterr().err


@pytest.mark.parametrize("detach,weight", [(False, 1.0), (True, 1.0), (False, 0.0)],
                         ids=["released", "detached-self-score", "alignment-weight-0"])
def test_detached_or_unweighted_self_score_leaves_the_positives_memory_without_gradient(
        workspace, detach, weight):
    """The positive's memory M_pos enters the loss only through s_pp = log p(pos | M_pos): with the
    stop-gradient it gets no gradient at all, without it it does; the query's memory gets one either
    way, and the loss value is the same. Alignment weight 0 leaves s_pp out of the loss: no gradient
    into M_pos either."""
    from autoregembed_fast.method.data import Tokenization, read_alignment_rows
    from autoregembed_fast.method.losses import AlignmentLoss
    from autoregembed_fast.method.loading import frozen_decoder, load_causal_lm, load_encoder
    from autoregembed_fast.method.training.objectives import AlignmentObjective
    from autoregembed_fast.method.training.references import References

    encoder = load_encoder(str(workspace["encoder"])).eval()
    decoder = frozen_decoder(load_causal_lm(str(workspace["base"]))[0])
    rows = read_alignment_rows(workspace["stage2"])
    references = References.load(rows, "none", None)
    memories = []

    def model(ids, mask, packed=True):
        memory = encoder(ids, mask, packed=packed).detach().requires_grad_()
        memories.append(memory)
        return memory

    losses_seen = []
    for flag in (detach, not detach):
        objective = AlignmentObjective(decoder, encoder.tokenizer, Tokenization(),
                                       AlignmentLoss(beta=1.0, alignment_weight=weight), references,
                                       True, flag)
        loss, count = objective(model, [0, 1, 2, 3], torch.device("cpu"))
        loss.backward()
        losses_seen.append(loss.item())
    memory = memories[0]
    assert memory.grad[:4].abs().sum() > 0  # queries
    assert (memory.grad[4:].abs().sum() == 0) == (detach or weight == 0)  # positives
    assert losses_seen[0] == pytest.approx(losses_seen[1], rel=1e-6)


def test_align_rejects_a_negative_alignment_weight(workspace, capsys):
    with pytest.raises(SystemExit):
        train.main(["align", "--encoder", str(workspace["encoder"]), "--decoder", str(workspace["base"]),
                    "--data", str(workspace["stage2"]), "--output", str(workspace["root"] / "unused"),
                    "--alignment-weight", "-1"])
    assert "--alignment-weight" in capsys.readouterr().err


def test_compress_token_lr_moves_the_compress_embeddings_at_their_own_rate(workspace, tmp_path):
    """One step of AdamW moves every trained element by about its lr (the first step's update is
    lr * sign(gradient)): with --compress-token-lr 100x --lr, the compress-token embeddings move
    100x further than the rest; and what is saved is what was trained (the rows of the saved
    embedding matrix, reloaded into the separate parameter)."""
    from autoregembed_fast.method.loading import load_encoder

    torch.manual_seed(0)
    start = load_encoder(str(workspace["base"]), 5)
    for name, extra in (("same", []), ("own", ["--compress-token-lr", "1e-2"])):
        train.main(["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                    "--output", str(tmp_path / name), "--batch-size", "4", "--steps", "1",
                    "--lr", "1e-4", "--warmup-ratio", "0", *extra])
    for name, expected in (("same", 1e-4), ("own", 1e-2)):
        model = AutoRegEmbed.from_pretrained(tmp_path / name / "model")
        moved = (model.compress_embeddings - start.compress_embeddings).abs().detach()
        assert moved.max().item() == pytest.approx(expected, rel=1e-2)
        rows = model.encoder.get_input_embeddings().weight[model.compress_ids]
        assert torch.equal(rows, model.compress_embeddings.data)
        layer = model.encoder.base_model.layers[0].mlp.down_proj.weight
        start_layer = start.encoder.base_model.layers[0].mlp.down_proj.weight
        assert (layer - start_layer).abs().max().item() == pytest.approx(1e-4, rel=1e-2)


def test_compress_rejects_a_bad_compress_token_lr(workspace, capsys):
    with pytest.raises(SystemExit):
        train.main(["compress", "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                    "--output", str(workspace["root"] / "unused"), "--compress-token-lr", "-1"])
    assert "--compress-token-lr" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedules(workspace, tmp_path, schedule):
    """The logged rate of each step: warm-up of 2 steps to --lr, then cosine to 0 or flat."""
    import math

    train.main(["compress", "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                "--output", str(tmp_path / "out"), "--batch-size", "4", "--steps", "6",
                "--lr", "1e-3", "--warmup-ratio", "0.3", "--lr-schedule", schedule])
    logged = [json.loads(line)["lr"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    # The rate logged after step s is the one the next step uses (factor of step index s).
    after_warmup = [1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))
                    for s in range(2, 7)]
    expected = [1e-3 * f for f in [1.0] + after_warmup]
    assert logged == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_warmup_decay_is_deepspeeds_schedule(workspace, tmp_path):
    """DeepSpeed's WarmupDecayLR as the released runs get it, worked out by hand from its formula:
    8 steps, warm-up ratio 0.5 -> w = 4; the rate of optimizer step s is gamma(s - 1), 0 at s = 0,
    gamma(t) = ln(t + 1) / ln 4 for t < 4, then (8 - t) / (8 - 4)."""
    train.main(["compress", "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                "--output", str(tmp_path / "out"), "--batch-size", "4", "--steps", "8",
                "--lr", "1e-3", "--warmup-ratio", "0.5"])  # the default schedule
    logged = [json.loads(line)["lr"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    # Logged after steps 0..7: the rates of steps 1..8 (step 8 is not run).
    factors = [0.0, 0.5, 0.7924812503605781, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert logged == pytest.approx([1e-3 * f for f in factors], rel=1e-9, abs=1e-15)
    assert lr_factor("warmup-decay", 8, 4)(0) == 0.0  # step 0, not logged


def test_compress_with_a_memory_projection_trains_and_saves_it(workspace, tmp_path):
    train.main(["compress", *COSINE, "--model", str(workspace["base"]), "--data", str(workspace["stage1"]),
                "--output", str(tmp_path / "out"), "--batch-size", "4", "--steps", "2", "--lr", "1e-3",
                "--memory-projection"])
    projection = AutoRegEmbed.from_pretrained(tmp_path / "out" / "model").memory_projection
    moved = (projection.weight - torch.eye(projection.weight.shape[0])).abs().max().item()
    # Each AdamW step moves an element by about lr (the first step by exactly lr * sign(gradient)).
    assert 0.9e-3 < moved <= 2.02e-3
