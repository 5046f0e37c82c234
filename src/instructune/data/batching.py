"""Turning encoded rows into batches: padded or packed tensors, and which rows go together.

Two layouts reach `instructune.train.loss.masked_lm_loss`:

- **padded** (`collate_padded`): [B, T] right-padded with `attention_mask`. The CPU default: with
  length-grouped batches (`length_grouped_batches`) little is wasted on padding.
- **packed** (`collate_packed`): all rows concatenated into one [1, T] sequence with `position_ids`
  that restart at 0 at every row and `cu_seq_lens` (the row boundaries), and *no* `attention_mask`.

Packed rows are kept apart (docs/masking.md, rule 12). In transformers 5.x, when a decoder gets `position_ids`
and no `attention_mask`, `masking_utils` detects every restart of the positions and builds a
block-diagonal causal mask for sdpa and eager attention (and composes it with sliding windows, as in
Gemma 3). That is exact, and the tests prove it: packed and padded give the same loss and gradients,
and changing one row's tokens leaves another row's token losses unchanged. With a flash-attention
implementation (CUDA), the loss passes `cu_seq_lens_q/k` and `max_length_q/k` so that the
variable-length kernel runs padding-free, without any mask. A 2-D `attention_mask` would switch the
detection off, so a packed batch never carries one. On CPU, one long packed row costs more than the
same tokens as several short padded rows (the T x T mask grows quadratically): pack into short bins.

With an instruction weight above 0 (docs/masking.md, rule 11a) both layouts also carry
`instruction_labels`, laid out like `labels`: the targets scored at that weight. With 0 they are not
built at all, so masked training sees exactly the batches it always did.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence

import torch

from instructune import IGNORE_INDEX
from instructune.data.encoded import EncodedRow
from instructune.data.weights import labels_outside

__all__ = ["collate_packed", "collate_padded", "length_grouped_batches", "pack_rows"]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (padding is masked anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _ids_and_labels(row: EncodedRow | Mapping) -> tuple[list[int], list[int]]:
    """The `input_ids` and `labels` of a row given as an `EncodedRow` or a mapping (lists or tensors)."""
    if isinstance(row, EncodedRow):
        ids, labels = row.input_ids, row.labels
    else:
        ids, labels = row["input_ids"], row["labels"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(ids) != len(labels):
        raise ValueError(f"a row has {len(ids)} input_ids but {len(labels)} labels")
    return ids, labels


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _with_instruction_labels(pairs: list[tuple[list[int], list[int]]], instruction_weight: float,
                             prefix_length: int) -> list[tuple[list[int], ...]]:
    """Each (ids, labels) with its instruction labels appended when the weight is not 0 (see data/weights.py)."""
    if not instruction_weight:
        return pairs
    return [(ids, labels, labels_outside(ids, labels, prefix_length)) for ids, labels in pairs]


def collate_padded(rows: Sequence[EncodedRow | Mapping], pad_token_id: int,
                   pad_to_multiple_of: int | None = None, *, instruction_weight: float = 0.0,
                   prefix_length: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad rows into `input_ids`, `labels` (-100 on padding) and `attention_mask`, all [B, T] int64.

    With an `instruction_weight` other than 0, also `instruction_labels` [B, T]: the targets the loss scores
    at that weight (`data.weights.instruction_labels`; the first `prefix_length` tokens are the BOS).
    """
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    pairs = _with_instruction_labels([_ids_and_labels(row) for row in rows], instruction_weight, prefix_length)
    length = _round_up(max(len(ids) for ids, *_ in pairs), pad_to_multiple_of)
    input_ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (ids, row_labels, *_) in enumerate(pairs):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if instruction_weight:
        batch["instruction_labels"] = torch.full_like(labels, IGNORE_INDEX)
        for i, (ids, _, instruction) in enumerate(pairs):
            batch["instruction_labels"][i, :len(ids)] = torch.tensor(instruction, dtype=torch.long)
    return batch


def collate_packed(rows: Sequence[EncodedRow | Mapping], pad_token_id: int,
                   pad_to_multiple_of: int | None = None, *, instruction_weight: float = 0.0,
                   prefix_length: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate rows into one [1, T] sequence: `input_ids`, `labels`, `position_ids`, `cu_seq_lens`.

    `position_ids` restart at 0 at each row; `cu_seq_lens` ([rows + 1], int32) holds the row boundaries.
    The first label of every row is -100: after the shift, the last position of row k would predict the
    first token of row k + 1, which is not row k's to predict (in a padded batch that target does not
    exist either). With `pad_to_multiple_of`, the padding tail forms one more row without targets.
    `instruction_weight` and `prefix_length` add `instruction_labels` as in `collate_padded`.
    """
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    input_ids: list[int] = []
    labels: list[int] = []
    instruction_labels: list[int] = []
    position_ids: list[int] = []
    boundaries = [0]
    for ids, row_labels, *instruction in _with_instruction_labels([_ids_and_labels(row) for row in rows],
                                                                  instruction_weight, prefix_length):
        if not ids:
            raise ValueError("cannot pack an empty row")
        input_ids += ids
        labels += [IGNORE_INDEX] + row_labels[1:]
        if instruction:
            instruction_labels += [IGNORE_INDEX] + instruction[0][1:]
        position_ids += range(len(ids))
        boundaries.append(len(input_ids))
    tail = _round_up(len(input_ids), pad_to_multiple_of) - len(input_ids)
    if tail:
        input_ids += [pad_token_id] * tail
        labels += [IGNORE_INDEX] * tail
        instruction_labels += [IGNORE_INDEX] * tail if instruction_weight else []
        position_ids += range(tail)
        boundaries.append(len(input_ids))
    batch = {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
    }
    if instruction_weight:
        batch["instruction_labels"] = torch.tensor([instruction_labels], dtype=torch.long)
    return batch


def _rng(seed: int, epoch: int) -> random.Random:
    """A generator determined by (seed, epoch) alone, independent of any global random state."""
    return random.Random(f"instructune-{seed}-{epoch}")


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                           shuffle: bool = True, group_size_multiplier: int = 16) -> list[list[int]]:
    """Batches of row indices with similar lengths, in a random order determined by (seed, epoch).

    Shuffle the indices, cut them into blocks of `batch_size * group_size_multiplier`, sort each block by
    length (longest first), cut the blocks into batches and shuffle the batch order. Rows of a batch are
    then close in length (little padding) while the order of the data stays random. Every index appears
    exactly once; only a block's last batch may be smaller than `batch_size`.
    """
    if batch_size < 1 or group_size_multiplier < 1:
        raise ValueError("batch_size and group_size_multiplier must be at least 1")
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    block = batch_size * group_size_multiplier
    batches = []
    for start in range(0, len(order), block):
        group = sorted(order[start:start + block], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def pack_rows(lengths: Sequence[int], max_tokens: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most `max_tokens` (best-fit decreasing), shuffled.

    Each row goes, longest first, into the open bin with the least room that still fits it, else into a
    new bin. Rows of equal length are taken in an order shuffled by (seed, epoch), so the bins vary
    across epochs; the order of the bins is shuffled too. A row longer than `max_tokens` (truncation
    normally happens earlier, when encoding with `max_length`) gets a bin of its own.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle breaks ties
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index) of the open bins, sorted
    for i in order:
        length = lengths[i]
        if length >= max_tokens:
            bins.append([i])
            continue
        k = bisect.bisect_left(room, (length, -1))
        if k < len(room):
            free, b = room.pop(k)
            bins[b].append(i)
            free -= length
        else:
            b, free = len(bins), max_tokens - length
            bins.append([i])
        if free > 0:
            bisect.insort(room, (free, b))
    rng.shuffle(bins)
    return bins
