#!/usr/bin/env bash
# The paper's AutoRegEmbed recipe (LLaMA-2-7B, both stages), as torchrun commands on one node.
#
#   MODEL=/models/Llama-2-7b-hf STAGE1=pwc_train_unique.jsonl STAGE2=medi_nli.jsonl OUT=runs/llama2-7b \
#   NPROC=4 recipes/llama2-7b.sh
#
# Released hyper-parameters (TrustedLLM/AutoRegEmbed, 4 x A100-80G, DeepSpeed ZeRO-1, bf16, gradient
# checkpointing): stage 1 lr 1e-5, 8 rows per GPU x 4 GPUs, 1 epoch, warm-up 5 %; stage 2 lr 5e-6,
# 32 rows per GPU x 4 GPUs, 4 epochs, warm-up 5 %, summed log-probs, beta 0.1, tau 0.1,
# one hard negative, the fixed instruction; text up to 4096 tokens, instruction up to 512; the
# schedule DeepSpeed's WarmupDecayLR from their config (its scheduler replaces the cosine their
# command lines name): `--lr-schedule warmup-decay`, the default of both commands. Here:
# FSDP2 over the ranks (--fsdp, fp32 master weights, bf16 compute), gradient checkpointing, the
# global batch of the paper whatever NPROC (8 GPUs: half the rows per GPU).
#
# Overrides (for a smaller run): PYTHON, NPROC, STAGE1_BATCH, STAGE2_BATCH (rows per GPU), STEPS (a
# fixed number of steps per stage instead of the epochs), SAVE_EVERY, EXTRA (more flags for every
# training command, e.g. "--max-text-tokens 512").
set -euo pipefail

: "${MODEL:?a local Hugging Face directory of the base model (e.g. Llama-2-7b-hf)}"
: "${STAGE1:?stage-1 JSONL: {context, instruction, output} rows}"
: "${STAGE2:?stage-2 JSONL: {query, pos, neg, instruction} rows}"
: "${OUT:?output directory}"
NPROC=${NPROC:-4}
STAGE1_BATCH=${STAGE1_BATCH:-$((32 / NPROC))}
STAGE2_BATCH=${STAGE2_BATCH:-$((128 / NPROC))}
SAVE_EVERY=${SAVE_EVERY:-200}
EXTRA=${EXTRA:-}
if [ -n "${STEPS:-}" ]; then STAGE1_LENGTH="--steps $STEPS"; STAGE2_LENGTH="--steps $STEPS"
else STAGE1_LENGTH="--epochs 1"; STAGE2_LENGTH="--epochs 4"; fi

# torchrun, through the Python that has the package (PYTHON=.venv/bin/python, for instance).
run() { "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m autoregembed_fast.train "$@"; }
common="--bf16 --fsdp --gradient-checkpointing --max-text-tokens 4096 --max-instruction-tokens 512"

# Stage 1: information compression (the whole encoder trains; the decoder is a frozen copy).
run compress --model "$MODEL" --data "$STAGE1" --output "$OUT/stage1" \
    --batch-size "$STAGE1_BATCH" $STAGE1_LENGTH --lr 1e-5 --warmup-ratio 0.05 \
    --save-every "$SAVE_EVERY" --resume $common $EXTRA

# Reference scores of the stage-1 model (each rank scores a shard; summed log-probs, as released).
run reference --encoder "$OUT/stage1/model" --decoder "$MODEL" --data "$STAGE2" \
    --output "$OUT/reference.pt" --batch-size "$STAGE2_BATCH" $EXTRA

# Stage 2: conditional distribution alignment.
run align --encoder "$OUT/stage1/model" --decoder "$MODEL" --data "$STAGE2" \
    --reference-scores "$OUT/reference.pt" --output "$OUT/stage2" \
    --batch-size "$STAGE2_BATCH" $STAGE2_LENGTH --lr 5e-6 --warmup-ratio 0.05 --beta 0.1 \
    --temperature 0.1 --save-every "$SAVE_EVERY" --resume $common $EXTRA
