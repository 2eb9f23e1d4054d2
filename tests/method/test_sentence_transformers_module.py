"""A saved AutoRegEmbed directory in sentence-transformers gives AutoRegEmbed.encode's embeddings."""

import json

import pytest
import torch

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

from autoregembed_fast.method.data import DataError, EVAL_PROMPT  # noqa: E402
from autoregembed_fast.method.embedders import last_token_embedder  # noqa: E402
from autoregembed_fast.method.loading import load_causal_lm  # noqa: E402
from autoregembed_fast.method.model import AutoRegEmbed, MemorySettings  # noqa: E402
from autoregembed_fast.method.sentence_transformers_files import DOCUMENT_PROMPT  # noqa: E402
from autoregembed_fast.method.sentence_transformers_module import (  # noqa: E402
    AutoRegEmbedModule, sentence_transformer,
)
from tiny_models import save_tiny_base, stage2_rows  # noqa: E402

# Texts of different lengths (3 to 13 words): the two libraries batch them differently.
TEXTS = [row["query"] + " and" * i for i, row in enumerate(stage2_rows(7))]


def saved_model(directory, tmp_path):
    """A trained-looking AutoRegEmbed (inner-layer memory after a bos, moved compress tokens)."""
    encoder, tokenizer = load_causal_lm(str(save_tiny_base(tmp_path / "base", weight_scale=5.0)))
    model = AutoRegEmbed.from_base(encoder, tokenizer,
                                   MemorySettings(k=3, bos_before_memory=True, memory_layer=1))
    with torch.no_grad():
        model.compress_embeddings.add_(torch.randn_like(model.compress_embeddings))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("st")
    return saved_model(tmp_path / "saved", tmp_path)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_sentence_transformer_encode_equals_autoregembed_encode(saved, batch_size):
    expected = AutoRegEmbed.from_pretrained(saved).eval().encode(TEXTS, batch_size=3)
    model = SentenceTransformer(str(saved), trust_remote_code=True)
    got = model.encode(TEXTS, batch_size=batch_size, convert_to_tensor=True)
    assert got.shape == (len(TEXTS), 32)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert model.get_embedding_dimension() == 32 and model.similarity_fn_name == "cosine"


def test_prompts_work_the_sentence_transformers_way(saved):
    reference = AutoRegEmbed.from_pretrained(saved).eval()
    model = SentenceTransformer(str(saved), trust_remote_code=True)
    assert model.default_prompt_name == "query" and model.prompts["query"] == EVAL_PROMPT

    def st(**kwargs):
        return model.encode(TEXTS, convert_to_tensor=True, **kwargs)

    def ours(template):
        return reference.encode(TEXTS, prompt=template)

    # A template (holding "{text}") is filled in; any other prompt is a prefix, braces kept as written.
    cases = [({}, EVAL_PROMPT), ({"prompt_name": "query"}, EVAL_PROMPT),
             ({"prompt_name": "document"}, DOCUMENT_PROMPT), ({"prompt": "query: "}, "query: {text}"),
             ({"prompt": "a {b} c: "}, "a {{b}} c: {text}"), ({"prompt": ""}, "{text}"),
             ({"prompt": "Say: {text} - done"}, "Say: {text} - done")]
    for kwargs, template in cases:
        assert torch.allclose(st(**kwargs), ours(template), atol=1e-6, rtol=0), kwargs
    assert not torch.allclose(st(prompt=""), st(), atol=1e-3)  # the prompt does reach the model


def test_a_resaved_model_gives_the_same_embeddings(saved, tmp_path):
    model = SentenceTransformer(str(saved), trust_remote_code=True)
    model.save(str(tmp_path / "resaved"))
    again = SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True)
    assert torch.equal(again.encode(TEXTS, convert_to_tensor=True),
                       model.encode(TEXTS, convert_to_tensor=True))


def test_the_last_token_baseline_saves_and_loads_the_same_way(tmp_path):
    base = save_tiny_base(tmp_path / "base", weight_scale=5.0)
    model = SentenceTransformer(modules=[AutoRegEmbedModule.last_token(str(base))])
    model.save(str(tmp_path / "baseline"))
    assert json.loads((tmp_path / "baseline" / "modules.json").read_text())[0]["type"].startswith(
        "autoregembed_fast.")
    loaded = SentenceTransformer(str(tmp_path / "baseline"), trust_remote_code=True)
    causal_lm, tokenizer = load_causal_lm(str(base))
    expected = last_token_embedder(causal_lm.eval(), tokenizer)(TEXTS)
    for batch_size in (1, 7):
        got = loaded.encode(TEXTS, batch_size=batch_size, convert_to_tensor=True)
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["memory", "last-token"])
def test_the_evaluate_builder_embeds_as_the_evaluate_embedder(saved, pooling):
    from autoregembed_fast.method.embedders import build_embedder

    expected = build_embedder(str(saved), pooling, 3, batch_size=4)(TEXTS)
    got = sentence_transformer(str(saved), pooling).encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_bad_input_names_the_problem(saved, tmp_path):
    model = SentenceTransformer(str(saved), trust_remote_code=True)
    with pytest.raises(DataError, match="empty"):
        model.encode(["a man plays", ""])
    with pytest.raises(DataError, match="empty"):
        AutoRegEmbed.from_pretrained(saved).encode([""])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved model"):
        sentence_transformer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a local directory"):
        AutoRegEmbedModule.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a model saved by autoregembed_fast"):
        AutoRegEmbedModule.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="pooling must be one of"):
        sentence_transformer(str(saved), "mean")
    with pytest.raises(ValueError, match="takes no model_kwargs"):
        SentenceTransformer(str(saved), trust_remote_code=True, model_kwargs={"dtype": torch.bfloat16})
