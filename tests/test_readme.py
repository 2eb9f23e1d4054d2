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
