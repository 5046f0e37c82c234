"""Per-token loss weights for `instruction_weight` (docs/masking.md, "Instruction weight").

A row's own `labels` say which tokens are responses (weight 1). With an instruction weight w in
[0, 1], the tokens that `train_on: all` would also score - system, user and tool content and the
template text around it - are scored too, at weight w. Never scored: position 0 (nothing precedes
it), the tokenizer's leading special tokens (BOS) and padding (which a row does not contain).
"""

from __future__ import annotations

import functools

from instructune import IGNORE_INDEX
from instructune.data.encoded import EncodedRow

__all__ = ["instruction_labels", "labels_outside", "token_weights", "tokenizer_prefix_length"]


def instruction_labels(row: EncodedRow, prefix_length: int = 1) -> list[int]:
    """The labels a row's instruction tokens carry at weight w: `input_ids[i]` at each position that
    the row's own labels leave unscored, `-100` at scored positions and at the first `prefix_length`
    positions (the tokenizer's BOS; position 0 is never a target, so `prefix_length` is at least 1).

    `labels` and `instruction_labels` are disjoint and together score every position from
    `prefix_length` on: exactly what `train_on: all` scores in a row without `train: false` turns.
    """
    return labels_outside(row.input_ids, row.labels, prefix_length)


def labels_outside(input_ids: list[int], labels: list[int], prefix_length: int = 1) -> list[int]:
    """`instruction_labels` of a row given as its `input_ids` and `labels` lists."""
    skip = max(prefix_length, 1)
    return [IGNORE_INDEX if i < skip or label != IGNORE_INDEX else token
            for i, (token, label) in enumerate(zip(input_ids, labels))]


@functools.lru_cache(maxsize=8)  # asked once per micro-batch; tokenizers hash by identity
def tokenizer_prefix_length(tokenizer) -> int:
    """How many leading special tokens (a BOS) the tokenizer puts before any text: never scored at any weight."""
    # The encoder's own rule, so the two never differ.
    from instructune.data.encode import prefix_special_ids_of

    return len(prefix_special_ids_of(tokenizer))


def token_weights(row: EncodedRow, instruction_weight: float, prefix_length: int = 1) -> list[float]:
    """Each token's weight in the loss: 1.0 where the row has a label, `instruction_weight` on its
    instruction positions (see `instruction_labels`), 0.0 elsewhere (position 0, the BOS)."""
    if not 0.0 <= instruction_weight <= 1.0:
        raise ValueError(f"instruction_weight must be in [0, 1], got {instruction_weight}")
    instruction = instruction_labels(row, prefix_length)
    return [1.0 if label != IGNORE_INDEX else instruction_weight if other != IGNORE_INDEX else 0.0
            for label, other in zip(row.labels, instruction)]
