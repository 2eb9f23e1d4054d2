"""The demo stands alone: its data ships with the repository, and nothing reads outside it."""

import hashlib
import re
from pathlib import Path

from autoregembed_fast import demo
from autoregembed_fast.data import ALIGNMENT_FIELDS, read_jsonl

ROOT = Path(__file__).resolve().parent.parent


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
