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


def test_reconstruction_nlls_against_the_decoder_run_directly(tmp_path):
    """"none" is the decoder's own loss on <bos> + target; "own" and "other" read the memory of the
    sentence itself and of the one half the list away, each scored by the decoder's own logits."""
    import torch
    from torch.nn import functional as F

    from autoregembed_fast.data import Tokenization, compression_batch
    from autoregembed_fast.model import load_causal_lm, load_encoder
    from tiny_models import save_tiny_base, stage1_rows

    base = str(save_tiny_base(tmp_path / "base"))
    model = load_encoder(base, 3).eval()
    decoder = load_causal_lm(base)[0].eval()
    rows = stage1_rows(5)
    got = demo.reconstruction_nlls(model, decoder, rows, batch_size=2)

    batch = compression_batch(model.tokenizer, rows, Tokenization())
    with torch.no_grad():
        memory = model(batch["input_ids"], batch["attention_mask"])
        embed = decoder.get_input_embeddings()
        totals, count = {"own": 0.0, "other": 0.0, "none": 0.0}, 0
        for i in range(len(rows)):
            target = batch["target_ids"][i][batch["target_mask"][i].bool()]
            prefixes = {"own": memory[i], "other": memory[(i + 2) % len(rows)],
                        "none": embed.weight[model.tokenizer.bos_token_id][None]}
            for name, prefix in prefixes.items():
                inputs = torch.cat([prefix, embed(target)])[None]
                logits = decoder(inputs_embeds=inputs).logits[0, len(prefix) - 1 : -1]
                totals[name] += F.cross_entropy(logits.double(), target, reduction="sum").item()
            count += len(target)
    for name, total in totals.items():
        assert abs(got[name] - total / count) <= 1e-5 * total / count
    assert got["own"] != got["other"]
