"""Tiny random Hugging Face decoders for tests (built from a config; nothing comes from a hub)."""

import torch
import transformers
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size=97, hidden_size=32, *, tied=True, head_bias=False, layers=2,
               max_positions=64):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if head_bias:
        model.lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model.eval().requires_grad_(False)


def tiny_gemma2(vocab_size=101, hidden_size=32, softcap=5.0):
    """A decoder whose config carries final_logit_softcapping (applied by its own forward)."""
    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, final_logit_softcapping=softcap, attn_logit_softcapping=None,
        sliding_window=64,
    )
    return Gemma2ForCausalLM(config).eval().requires_grad_(False)


# Tiny random members of every model family patch_model supports.
VOCAB, HIDDEN = 97, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def family_config(family):
    """(model class, config) of a tiny random member of a family; built here, nothing from a hub."""
    if family == "llama-untied":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "smollm":  # SmolLM/SmolLM2 are Llama models with tied embeddings
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralForCausalLM, transformers.MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON)
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**COMMON, head_dim=8)
    if family == "gemma2":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **COMMON, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=None,
            sliding_window=64)
    if family == "gemma3":
        return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **COMMON, head_dim=8, final_logit_softcapping=3.0, sliding_window=64)
    if family == "phi3":
        return transformers.Phi3ForCausalLM, transformers.Phi3Config(**COMMON, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ["gemma2", "gemma3", "llama-untied", "llama-head-bias", "mistral", "phi3", "qwen2", "qwen3",
            "smollm"]


def tiny_model(family, seed=0):
    torch.manual_seed(seed)
    if family == "llama-head-bias":
        model_class, config = family_config("llama-untied")
        model = model_class(config)
        model.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    else:
        model_class, config = family_config(family)
        model = model_class(config)
    # Larger weights than the default init: the logits spread, so a wrong loss cannot hide in noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model.float()


WORDS = ("a man woman child dog cat is are plays runs sits eats reads sleeps in on the park house "
         "garden street ball book food quickly slowly happy sad red blue green big small two three "
         "people outside inside near under over").split()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on a small word list (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + "\nThis sentence means in one word: “" for i in range(len(WORDS))]
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", unk_token="<unk>")


def random_sentence(generator, length=6):
    picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
    return " ".join(WORDS[i] for i in picks)


def save_tiny_base(directory, hidden_size=32, layers=2, weight_scale=1.0):
    """A tiny Llama + tokenizer saved as a Hugging Face model directory. `weight_scale` multiplies
    every weight matrix: at the default init (std 0.02) the logits hardly depend on the input, so a
    decoder that must read its input (memory capacity) needs sharper ones."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=hidden_size, layers=layers,
                       max_positions=256)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(weight_scale)
    model.requires_grad_(True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage1_rows(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        sentence = random_sentence(generator)
        rows.append({"context": sentence, "instruction": "Repeat the sentence.", "output": sentence})
    return rows


def stage2_rows(n, seed=1, n_negatives=1):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        query = random_sentence(generator)
        negatives = [random_sentence(generator) for _ in range(n_negatives)]
        rows.append({"query": query, "pos": query + " " + random_sentence(generator, 2),
                     "neg": negatives[0] if n_negatives == 1 else negatives,
                     "instruction": "Retrieve a sentence that entails it."})
    return rows
