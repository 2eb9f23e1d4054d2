"""The trainable encoder of AutoRegEmbed: a causal LM and its compress tokens, whose states at those
tokens are a text's memory embeddings; saved and reloaded with its settings."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from autoregembed_fast.method.data import EVAL_PROMPT
from autoregembed_fast.method.packing import check_packing_support, pack_sequences, packing_of
from autoregembed_fast.method.scoring import check_right_padded
from autoregembed_fast.method.sentence_transformers_files import write_sentence_transformers_config

CONFIG_FILE = "autoregembed.json"
PROJECTION_FILE = "memory_projection.pt"  # with memory_projection: its weight and bias


@dataclass(frozen=True)
class MemorySettings:
    """How the encoder writes a text's memory and the decoder reads it: settings of a trained model,
    saved with it (`CONFIG_FILE`) and read back by stage 2, the reference scores and the evaluation.
    The defaults are the released method. `train compress` makes one flag per field (`help`)."""

    k: int = field(default=5, metadata={"help": "compress tokens: the memory's length"})
    memory_layer: int | None = field(default=None, metadata={
        "help": "take the memory from this encoder layer's output (1 .. layers - 1, before any norm) "
                "instead of the last hidden states (the released method)"})
    memory_norm: float | None = field(default=None, metadata={
        "help": "rescale each memory vector to this L2 norm (None: as the encoder writes it, the "
                "released method)"})
    memory_projection: bool = field(default=False, metadata={
        "help": "a trainable d x d linear map of the memory (with bias), started at the identity, "
                "applied before any rescaling (not in the released method)"})
    bos_before_memory: bool = field(default=False, metadata={
        "help": "the decoder reads [bos ; memory ; target] instead of the released [memory ; target]"})

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.memory_norm is not None and not self.memory_norm > 0:
            raise ValueError(f"memory_norm must be positive or None, got {self.memory_norm!r}")


def layers_and_final_norm(base_model) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder layers and the final norm of a Hugging Face base model (Llama, Mistral, Qwen,
    Gemma... name them `layers` and `norm`)."""
    layers, norm = getattr(base_model, "layers", None), getattr(base_model, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        raise ValueError(f"memory_layer needs a base model with `layers` and a final `norm` (as "
                         f"Llama's); {type(base_model).__name__} has not")
    return layers, norm


@contextlib.contextmanager
def first_layers_only(base_model, count: int):
    """Within the block, base_model runs its first `count` layers and no final norm: its
    last_hidden_state is layer `count`'s output, which its full forward returns as
    hidden_states[count]."""
    layers, norm = layers_and_final_norm(base_model)
    base_model.layers, base_model.norm = layers[:count], nn.Identity()
    try:
        yield
    finally:
        base_model.layers, base_model.norm = layers, norm


def compress_token(i: int) -> str:
    return f"<EMBED{i}>"


class AutoRegEmbed(nn.Module):
    """The trainable encoder of AutoRegEmbed: a causal LM whose last hidden states at `k` compress
    tokens `<EMBED0>`..`<EMBED{k-1}>`, placed right after a text, are the text's memory embeddings.

    `forward` = `compress`. Build one from a base model with `from_base`, save and reload with
    `save_pretrained` / `from_pretrained` (encoder, tokenizer, `MemorySettings`, prompt). What the
    settings change, measured: the encoder's last hidden states come out of its final norm at ~15x
    the norm of the decoder's input embeddings (48 vs 3.2 for SmolLM2-135M), and rescaling them
    (`memory_norm`) makes the first stage-1 steps sane; an inner `memory_layer` made stage 1
    compress within 250 steps (docs/stage1-compression.md).
    """

    def __init__(self, encoder, tokenizer, settings: MemorySettings = MemorySettings(),
                 prompt: str = EVAL_PROMPT):
        super().__init__()
        layers = encoder.config.num_hidden_layers
        if settings.memory_layer is not None and not 1 <= settings.memory_layer < layers:
            raise ValueError(f"memory_layer must be in [1, {layers - 1}] (the encoder has {layers} "
                             f"layers; None takes the last hidden states), got "
                             f"{settings.memory_layer!r}")
        if settings.bos_before_memory and tokenizer.bos_token_id is None:
            raise ValueError("bos_before_memory needs a tokenizer with a bos token")
        self.settings = settings
        tokens = [compress_token(i) for i in range(settings.k)]
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the compress tokens: build with AutoRegEmbed.from_base")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.register_buffer("compress_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        # The k compress-token embeddings live apart from the encoder's embedding matrix (whose
        # rows for them are then unused) so that they can train at a learning rate of their own
        # (`--compress-token-lr`); `save_pretrained` writes them back into those rows.
        embedding = encoder.get_input_embeddings().weight
        self.compress_embeddings = nn.Parameter(embedding.detach()[self.compress_ids].clone())
        self.memory_projection = None
        if settings.memory_projection:
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
        # Likewise the layers above an inner memory layer and the final norm: they cannot reach the
        # memory, and `_hidden_states` does not run them.
        if settings.memory_layer is not None:
            layers, norm = layers_and_final_norm(encoder.base_model)
            layers[settings.memory_layer:].requires_grad_(False)
            norm.requires_grad_(False)

    @classmethod
    def from_base(cls, encoder, tokenizer, settings: MemorySettings = MemorySettings(),
                  prompt: str = EVAL_PROMPT):
        """Adds the k compress tokens to the tokenizer and the encoder's embeddings."""
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [compress_token(i) for i in range(settings.k)]})
        encoder.resize_token_embeddings(len(tokenizer))
        return cls(encoder, tokenizer, settings, prompt)

    # The settings, read where the code speaks of them.
    k = property(lambda self: self.settings.k)
    memory_layer = property(lambda self: self.settings.memory_layer)
    memory_norm = property(lambda self: self.settings.memory_norm)
    bos_before_memory = property(lambda self: self.settings.bos_before_memory)

    @property
    def decoder_bos_id(self) -> int | None:
        """The token the decoder reads before the memory (`memory_for_decoder`), or None."""
        return self.tokenizer.bos_token_id if self.bos_before_memory else None

    @property
    def hidden_size(self) -> int:
        return self.encoder.get_input_embeddings().weight.shape[1]

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 packed: bool = True) -> torch.Tensor:
        """Memory embeddings [B, k, d] of right-padded texts input_ids [B, T] (mask [B, T]): the
        compress tokens go right after each row's last real token. `packed`: the texts run
        padding-free, packed into a few rows (`autoregembed_fast.method.packing`); False: as one
        right-padded batch (for models whose attention would cross packed sequences)."""
        check_right_padded(attention_mask, "attention_mask")
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
        output, from the layers up to it alone (the layer-15 memory of a 30-layer model costs half
        a forward)."""
        base = self.encoder.base_model
        if self.memory_layer is None:
            return base(**inputs, use_cache=False).last_hidden_state
        with first_layers_only(base, self.memory_layer):
            return base(**inputs, use_cache=False).last_hidden_state

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
            {"prompt": self.prompt, **asdict(self.settings)}, indent=2))
        write_sentence_transformers_config(directory, "memory", self.prompt)

    @classmethod
    def from_pretrained(cls, directory):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ValueError(f"{directory} holds no {CONFIG_FILE}: not a saved AutoRegEmbed model")
        config = json.loads((directory / CONFIG_FILE).read_text())
        encoder = AutoModelForCausalLM.from_pretrained(directory)
        prompt = config.pop("prompt")
        model = cls(encoder, AutoTokenizer.from_pretrained(directory), MemorySettings(**config), prompt)
        if model.memory_projection is not None:
            model.memory_projection.load_state_dict(torch.load(directory / PROJECTION_FILE))
        return model
