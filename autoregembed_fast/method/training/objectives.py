"""Training objectives: each maps a batch of data rows to (sum of per-item losses, number of items), so
that the loop can normalise by the global count over ranks and accumulation micro-batches."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from autoregembed_fast.method.data import (
    Tokenization,
    alignment_batch,
    compression_batch,
    encoder_ids,
    instruction_for,
    negatives_of,
    pad,
    pad_id_of,
    split_alignment_scores,
    target_ids,
)
from autoregembed_fast.huggingface import lm_head_of
from autoregembed_fast.method.losses import AlignmentLoss, CompressionLoss
from autoregembed_fast.method.scoring import (
    decoder_scoring_inputs,
    memory_for_decoder,
    score_targets,
)


class CompressionObjective:
    """Stage 1: token cross-entropy of output + [eos] given the memory of context + instruction.
    `decoder_bos_id`: the token the decoder reads before the memory (`AutoRegEmbed.decoder_bos_id`);
    `packed`: the decoder runs padding-free (False: one right-padded batch)."""

    def __init__(self, decoder, tokenizer, settings: Tokenization, rows, decoder_bos_id=None,
                 packed: bool = True):
        self.decoder, self.tokenizer, self.settings, self.rows = decoder, tokenizer, settings, rows
        self.decoder_bos_id, self.packed = decoder_bos_id, packed
        self.target_lengths = [len(target_ids(tokenizer, row["output"], settings)) for row in rows]
        self.loss = CompressionLoss(shift=False, reduction="sum", softcap=lm_head_of(decoder)[2])

    def count(self, rows) -> int:
        return sum(self.target_lengths[i] for i in rows)

    def __call__(self, model, rows, device):
        data = [self.rows[i] for i in rows]
        batch = {k: v.to(device) for k, v in compression_batch(self.tokenizer, data, self.settings).items()}
        memory = memory_for_decoder(
            self.decoder, model(batch["input_ids"], batch["attention_mask"], packed=self.packed),
            self.decoder_bos_id)
        index = torch.arange(len(rows), device=device)
        hidden, labels, weight, bias, _ = decoder_scoring_inputs(
            self.decoder, memory, batch["target_ids"], batch["target_mask"], index, self.packed)
        return self.loss(hidden, weight, labels, bias), int(batch["target_mask"].sum())


def sequence_scores(decoder, memory, batch, average: bool, packed: bool = True):
    scores = score_targets(decoder, memory, batch["target_ids"], batch["target_mask"],
                           batch["memory_index"], packed=packed)
    return scores / batch["target_mask"].sum(dim=1) if average else scores


# A sigmoid term counts as saturated when its argument is beyond +-4.6 (sigmoid within 1 % of 0 or 1):
# its gradient is then below 1 % of the largest.
SATURATED = 4.6


@torch.no_grad()
def alignment_terms(s_qp, s_pp, s_qn, ref_pos, ref_neg, beta: float, reference_sign: int) -> dict:
    """What the alignment loss sees, per term (flat tensors): the margins (s_qp - s_qn) + sign (r+ -
    r-), the gaps |s_qp - s_pp|, whether each sigmoid term is saturated (its argument beyond
    +-SATURATED) and whether each negative scores below the positive under M_query."""
    margin = (s_qp[:, None] - s_qn) + reference_sign * (ref_pos[:, None] - ref_neg)
    gap = (s_qp - s_pp).abs()
    return {"margin": margin.flatten(), "gap": gap,
            "s1_saturated": (beta * gap > SATURATED).float(),
            "s2_saturated": ((beta * margin).abs() > SATURATED).float().flatten(),
            "pos_over_neg": (s_qp[:, None] > s_qn).float().flatten()}


class AlignmentObjective:
    """Stage 2: one encoder pass over queries and positives, one decoder scoring pass over
    pos | M_query, pos | M_pos and every neg | M_query, the alignment loss against cached references.
    With `detach_self_score`, s_pp = log p(pos | M_pos) is a constant target for s_qp: the alignment
    term then moves the query's memory only, and cannot be met by making the positive's own
    reconstruction worse. With `in_batch_negatives`, the other rows' positives are negatives too,
    with `in_batch_hard_negatives` the other rows' negatives (scored under M_query; their reference
    term is 0, as no stage-1 score of them under this query's memory is cached).
    `decoder_bos_id`, `packed`: as in `CompressionObjective`. `diagnostics()` returns what the loss
    saw since the last call (the loop logs it with each step)."""

    def __init__(self, decoder, tokenizer, settings, loss: AlignmentLoss, references, average,
                 detach_self_score: bool = False, decoder_bos_id=None, packed: bool = True,
                 in_batch_negatives: bool = False, in_batch_hard_negatives: bool = False):
        self.decoder, self.tokenizer, self.settings = decoder, tokenizer, settings
        self.loss, self.references, self.average = loss, references, average
        self.detach_self_score, self.in_batch_negatives = detach_self_score, in_batch_negatives
        self.in_batch_hard_negatives = in_batch_hard_negatives
        self.decoder_bos_id, self.packed = decoder_bos_id, packed
        self._seen = []

    def count(self, rows) -> int:
        return len(rows)

    def __call__(self, model, rows, device):
        batch = alignment_batch(self.tokenizer, [self.references.rows[i] for i in rows], self.settings,
                                in_batch_negatives=self.in_batch_negatives,
                                in_batch_hard_negatives=self.in_batch_hard_negatives)
        n_negatives = batch.pop("n_negatives")
        batch = {k: v.to(device) for k, v in batch.items()}
        memory = memory_for_decoder(
            self.decoder, model(batch["input_ids"], batch["attention_mask"], packed=self.packed),
            self.decoder_bos_id)
        scores = sequence_scores(self.decoder, memory, batch, self.average, self.packed)
        s_qp, s_pp, s_qn = split_alignment_scores(scores.float(), len(rows), n_negatives)
        if self.detach_self_score:
            s_pp = s_pp.detach()
        ref_pos, ref_neg = self.references.of(rows, device)
        if self.in_batch_negatives or self.in_batch_hard_negatives:
            # ref_pos - ref_neg = 0 for the in-batch negatives: a margin without a reference term.
            extra = s_qn.shape[1] - ref_neg.shape[1]
            ref_neg = torch.cat([ref_neg, ref_pos[:, None].expand(-1, extra)], dim=1)
        self._seen.append(alignment_terms(s_qp, s_pp, s_qn, ref_pos, ref_neg, self.loss.beta,
                                          self.loss.reference_sign))
        return self.loss(s_qp, s_pp, s_qn, ref_pos, ref_neg) * len(rows), len(rows)

    def diagnostics(self) -> dict:
        """Since the last call, over every micro-batch of this rank: the margin's mean and spread,
        the mean |s_qp - s_pp|, the fractions of s1 = sigmoid(beta |s_qp - s_pp|) and of
        s2 = sigmoid(beta margin) terms that are saturated, and the fraction of negatives scored
        below the positive under M_query."""
        if not self._seen:
            return {}
        seen = {key: torch.cat([terms[key] for terms in self._seen]) for key in self._seen[0]}
        self._seen = []
        margin = seen.pop("margin")
        return {"margin_mean": float(margin.mean()),
                "margin_std": float(margin.std()) if margin.numel() > 1 else 0.0,
                "self_gap_mean": float(seen.pop("gap").mean()),
                **{key: float(value.mean()) for key, value in seen.items()}}


class ContrastiveObjective:
    """The paper's baseline on the same data: InfoNCE over in-batch positives and hard negatives on
    the same mean-of-memory embeddings (in-batch means within each rank's batch)."""

    def __init__(self, tokenizer, settings, rows, temperature: float, packed: bool = True):
        self.tokenizer, self.settings, self.rows, self.temperature = tokenizer, settings, rows, temperature
        self.packed = packed

    def count(self, rows) -> int:
        return len(rows)

    def __call__(self, model, rows, device):
        texts = [self.rows[i] for i in rows]
        # Queries, then positives, then every hard negative: candidates = positives + negatives.
        pairs = [(row["query"], row) for row in texts] + [(row["pos"], row) for row in texts]
        pairs += [(neg, row) for row in texts for neg in negatives_of(row)]
        sequences = [encoder_ids(self.tokenizer, text, instruction_for(row, self.settings), self.settings)
                     for text, row in pairs]
        ids, mask = pad(sequences, pad_id_of(self.tokenizer))
        memory = model(ids.to(device), mask.to(device), packed=self.packed)
        embeddings = F.normalize(memory.float().mean(dim=1), dim=-1)
        batch = len(rows)
        query, candidates = embeddings[:batch], embeddings[batch:]
        logits = query @ candidates.t() / self.temperature
        targets = torch.arange(batch, device=device)
        return F.cross_entropy(logits, targets, reduction="sum"), batch
