"""Per-token log-probabilities of chosen targets through the model's own forward (for explain and eval).

Token t is scored from the logits at position t - 1: `log p(token_t | tokens_<t)`. The forward is the
model's own (`model(...).logits`), so whatever it does to its logits (Gemma's soft-cap, Cohere's
scale) is included, and a LoRA adapter applies as in training. Only the logit rows that predict a
chosen target are computed when the model takes `logits_to_keep` (almost every causal LM in
transformers 5), which keeps a batch at [rows, kept positions, vocabulary] instead of the full length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from instructune.use.generation import accepts_logits_to_keep


@dataclass
class RowScores:
    """What the model thinks of each chosen target of one row; lists are parallel to `positions`."""

    positions: list[int]
    """Indices of the scored tokens (each >= 1: nothing predicts the first token)."""
    log_probs: list[float]
    """`log p(token | everything before it)` for each scored token."""
    correct: list[bool]
    """Whether the model's most likely token (argmax) at that position is the token itself."""
    top_ids: list[list[int]] = field(default_factory=list)
    """The `top_k` most likely tokens at each position, most likely first (empty when top_k is 0)."""
    top_probs: list[list[float]] = field(default_factory=list)
    """Their probabilities."""


@torch.no_grad()
def score_batch(model, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], *,
                pad_token_id: int, top_k: int = 0) -> list[RowScores]:
    """Score `positions[i]` of `rows[i]` for a batch of token-id rows in one (right-padded) forward."""
    if len(rows) != len(positions):
        raise ValueError("rows and positions must have the same length")
    for row, chosen in zip(rows, positions):
        if any(p < 1 or p >= len(row) for p in chosen):
            raise ValueError("a scored position must be in 1..len(row)-1")
    device = next(model.parameters()).device
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    # Right padding leaves every real token at its natural position, so no position_ids are needed.
    predictors = sorted({p - 1 for chosen in positions for p in chosen})
    if not predictors:
        return [RowScores([], [], []) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        if accepts_logits_to_keep(model):
            keep = torch.tensor(predictors, dtype=torch.long, device=device)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                           logits_to_keep=keep).logits
            column = {p: k for k, p in enumerate(predictors)}
        else:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            column = {p: p for p in predictors}
    finally:
        model.train(was_training)

    row_index = [i for i, chosen in enumerate(positions) for _ in chosen]
    col_index = [column[p - 1] for chosen in positions for p in chosen]
    targets = torch.tensor([rows[i][p] for i, chosen in enumerate(positions) for p in chosen], device=device)
    # fp32 whatever the weights: probabilities of bf16 logits would be visibly coarse.
    log_probs = torch.log_softmax(logits[row_index, col_index].float(), dim=-1)
    target_lp = log_probs.gather(1, targets[:, None]).squeeze(1)
    correct = log_probs.argmax(dim=-1) == targets
    top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1) if top_k > 0 else None

    results, start = [], 0
    for chosen in positions:
        end = start + len(chosen)
        scores = RowScores(positions=list(chosen), log_probs=target_lp[start:end].tolist(),
                           correct=correct[start:end].tolist())
        if top is not None:
            scores.top_ids = top.indices[start:end].tolist()
            scores.top_probs = top.values[start:end].exp().tolist()
        results.append(scores)
        start = end
    return results
