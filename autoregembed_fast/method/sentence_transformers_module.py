"""AutoRegEmbed in sentence-transformers: a saved model directory loads with
``SentenceTransformer(directory)``, through the module named in its ``modules.json``.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("demo-output/stage2")          # any AutoRegEmbed.save_pretrained dir
    embeddings = model.encode(["A man plays a guitar."])         # == AutoRegEmbed.encode

Two poolings, as in `autoregembed_fast.evaluate`: "memory" (AutoRegEmbed: the mean of the k memory
embeddings) and "last-token" (a base causal LM's last hidden state after the prompt, the untrained
baseline; build it with `AutoRegEmbedModule.last_token(base)` and save it with
`SentenceTransformer(modules=[...]).save(directory)`).

Prompts work the sentence-transformers way (`prompt=`, `prompt_name=`, the saved "query" prompt as the
default); a prompt holding "{text}" is a template (the released evaluation's prompts put the text in the
middle), any other prompt is a prefix, as in sentence-transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers.base.modules import InputModule

from autoregembed_fast.method.data import EVAL_PROMPT, prompted_batch
from autoregembed_fast.method.embedders import causal_lm_of, last_token_embeddings
from autoregembed_fast.method.loading import load_causal_lm, load_encoder
from autoregembed_fast.method.model import CONFIG_FILE, AutoRegEmbed
from autoregembed_fast.method.sentence_transformers_files import (
    DOCUMENT_PROMPT,
    SENTENCE_TRANSFORMERS_MODULE_FILE,
    write_sentence_transformers_config,
)

POOLINGS = ("memory", "last-token")
MAX_TOKENS = 512  # the released evaluation's max length


def as_template(prompt: str) -> str:
    """A sentence-transformers prompt as a `prompted_batch` template: kept when it holds "{text}",
    otherwise a prefix (its braces escaped) before the text."""
    if "{text}" in prompt:
        return prompt
    return prompt.replace("{", "{{").replace("}", "}}") + "{text}"


class AutoRegEmbedModule(InputModule):
    """The one module of an AutoRegEmbed sentence-transformers model: tokenizes with the prompt, then
    pools (see the module docstring). `model` is an `AutoRegEmbed` ("memory") or a causal LM
    ("last-token"); `prompt` is used when sentence-transformers passes none."""

    config_file_name = SENTENCE_TRANSFORMERS_MODULE_FILE

    def __init__(self, model, tokenizer, pooling: str = "memory", prompt: str = EVAL_PROMPT):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "memory" and not isinstance(model, AutoRegEmbed):
            raise TypeError(f"memory pooling needs an AutoRegEmbed model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompt = prompt
        self.max_seq_length = MAX_TOKENS

    @classmethod
    def last_token(cls, base: str, prompt: str = EVAL_PROMPT) -> "AutoRegEmbedModule":
        """The untrained baseline: a base model (directory or "smollm2") with last-token pooling; a
        saved AutoRegEmbed directory gives its trained encoder."""
        model, tokenizer = causal_lm_of(base)
        return cls(model.eval(), tokenizer, "last-token", prompt)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """Token ids and mask of `[bos] + prompt(text)` (the module's prompt when none is given)."""
        template = self.prompt if prompt is None else as_template(prompt)
        ids, mask = prompted_batch(self.tokenizer, list(inputs), template, MAX_TOKENS)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        ids, mask = features["input_ids"], features["attention_mask"]
        if self.pooling == "memory":
            features["sentence_embedding"] = self.model.embed(ids, mask)
        else:
            features["sentence_embedding"] = last_token_embeddings(self.model, ids, mask)
        return features

    def get_embedding_dimension(self) -> int:
        encoder = self.model.encoder if self.pooling == "memory" else self.model
        return encoder.get_input_embeddings().weight.shape[1]

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        if self.pooling == "memory":
            self.model.save_pretrained(output_path)  # writes the sentence-transformers files too
            return
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        write_sentence_transformers_config(output_path, "last-token", self.prompt)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict | None = None,
             **kwargs) -> "AutoRegEmbedModule":
        """From a local directory written by `save` or `AutoRegEmbed.save_pretrained`."""
        directory = Path(model_name_or_path, subfolder)
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a local directory: AutoRegEmbed models load from a "
                             "saved directory (download a hub model first)")
        if model_kwargs:
            raise ValueError(f"AutoRegEmbedModule takes no model_kwargs (got {sorted(model_kwargs)}); "
                             "move or cast the loaded model instead (model.to(...))")
        settings_file = directory / SENTENCE_TRANSFORMERS_MODULE_FILE
        if not settings_file.is_file():
            raise ValueError(f"{directory} holds no {SENTENCE_TRANSFORMERS_MODULE_FILE}: not a model "
                             "saved by autoregembed_fast")
        pooling = json.loads(settings_file.read_text()).get("pooling")
        if pooling == "memory":
            if not (directory / CONFIG_FILE).is_file():
                raise ValueError(f"{directory} holds no {CONFIG_FILE}: not a saved AutoRegEmbed model")
            model = AutoRegEmbed.from_pretrained(directory).eval()
            return cls(model, model.tokenizer, "memory", model.prompt)
        if pooling == "last-token":
            prompts = json.loads((directory / "config_sentence_transformers.json").read_text())
            model, tokenizer = load_causal_lm(str(directory))
            return cls(model.eval(), tokenizer, "last-token", prompts["prompts"]["query"])
        raise ValueError(f"{settings_file}: pooling must be one of {POOLINGS}, got {pooling!r}")


def sentence_transformer(encoder: str, pooling: str = "memory", k: int = 5):
    """The SentenceTransformer of what `python -m autoregembed_fast.evaluate --encoder ... --pooling
    ...` embeds with: a saved AutoRegEmbed directory through its own files (memory pooling), otherwise
    the module built around the model (a base model gets k fresh compress tokens for memory pooling,
    as in `load_encoder`)."""
    from sentence_transformers import SentenceTransformer

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    saved = Path(encoder, CONFIG_FILE).is_file()
    if pooling == "memory" and saved and Path(encoder, "modules.json").is_file():
        # sentence-transformers >= 6 asks for trust_remote_code for every module class outside its
        # own package, an installed one too; nothing is imported from the directory itself.
        return SentenceTransformer(encoder, trust_remote_code=True)
    if pooling == "memory":
        model = load_encoder(encoder, k).eval()
        module = AutoRegEmbedModule(model, model.tokenizer, "memory", model.prompt)
    else:
        module = AutoRegEmbedModule.last_token(encoder)
    return SentenceTransformer(modules=[module], similarity_fn_name="cosine",
                               prompts={"query": module.prompt, "document": DOCUMENT_PROMPT},
                               default_prompt_name="query")
