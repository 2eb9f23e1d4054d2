"""The files through which sentence-transformers reads a saved model directory
(`SentenceTransformer(directory)`); writing them needs no sentence-transformers, so every saved model
carries them. The module class itself lives in `autoregembed_fast.method.sentence_transformers_module`."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCE_TRANSFORMERS_MODULE = ("autoregembed_fast.method.sentence_transformers_module."
                                "AutoRegEmbedModule")
SENTENCE_TRANSFORMERS_MODULE_FILE = "autoregembed_sentence_transformers.json"
# The released evaluation's prompt for retrieval documents (SPEC: queries and STS use EVAL_PROMPT).
DOCUMENT_PROMPT = 'Passage: "{text}". Use one word to represent the passage in a retrieval task. The word is: “'


def write_sentence_transformers_config(directory, pooling: str, prompt: str) -> None:
    """The sentence-transformers files of a model directory: `modules.json` (one module of ours),
    the module's settings (`pooling`: "memory" or "last-token") and `config_sentence_transformers.json`
    with the prompts ("query" = `prompt`, the default; "document" = `DOCUMENT_PROMPT`) and cosine
    similarity."""
    directory = Path(directory)
    (directory / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}], indent=2))
    (directory / SENTENCE_TRANSFORMERS_MODULE_FILE).write_text(json.dumps({"pooling": pooling},
                                                                          indent=2))
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": prompt, "document": DOCUMENT_PROMPT}, "default_prompt_name": "query",
         "similarity_fn_name": "cosine"}, indent=2))
