"""Which rows each optimizer step trains on, and what the step's summed loss is divided by.

Both are pure functions of their inputs, so a resumed run recomputes exactly the batches and the
denominators the interrupted run would have used, on any number of ranks.

Bounded activation memory (`max_tokens_per_forward`): the step's loss is a sum over its targets divided
by one count taken over the whole step (`step_counts`, before any backward), so a micro-batch can be
run as several forward passes without changing what is computed, only the order of the additions.
`split_by_tokens` cuts each rank's share of a micro-batch into consecutive groups of rows that fit the
token budget; a row longer than the budget goes alone and its forward recomputes activations in
backward (`recompute`). Rows are never cut, so every row's attention and targets stay as they were.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

from instructune.data.batching import length_grouped_batches, pack_rows
from instructune.train.config import TrainConfig
from instructune.train.distributed import Parallel, rank_share
from instructune.train.loss import count_instruction_targets, step_normalizer, step_row_count


def forward_tokens(rows: Sequence[int], lengths: Sequence[int], *, padded: bool) -> int:
    """Positions one forward pass over `rows` computes: rows x longest when padded, else their sum."""
    if not rows:
        return 0
    return len(rows) * max(lengths[i] for i in rows) if padded else sum(lengths[i] for i in rows)


def split_by_tokens(rows: Sequence[int], lengths: Sequence[int], budget: int | None, *,
                    padded: bool) -> list[list[int]]:
    """`rows` cut into consecutive groups of at most `budget` tokens each (`forward_tokens`), in order.

    A row longer than the budget forms a group of its own (rows are never cut). Greedy: a group grows
    until the next row would not fit. No budget (None or 0), or no rows: one group, `rows` unchanged.
    """
    if not budget or not rows:
        return [list(rows)]
    groups: list[list[int]] = [[]]
    for index in rows:
        if groups[-1] and forward_tokens(groups[-1] + [index], lengths, padded=padded) > budget:
            groups.append([])
        groups[-1].append(index)
    return groups


class StepPlan:
    """The micro-batches of every optimizer step, as row indices: a pure function of (seed, epoch, step).

    Each epoch's micro-batches come from length-grouped shuffled blocks (or packed bins with
    `packing`); a step takes `grad_accum` of them, and an epoch's last step may take fewer. With
    `max_steps` beyond the data, epochs simply continue. Ranks: the micro-batches are the same whatever
    `world_size` is (they are the global batch); rank r keeps its `rank_share` of each, which may be
    empty, so every rank runs the same number of micro-batches.

    With a token budget (`tokens_per_forward`, set by the run's setup from `max_tokens_per_forward`),
    each rank's share is split into forward passes (`split_by_tokens`). Every rank computes every rank's
    split, so all run as many forwards per micro-batch (FSDP gathers the weights in each): a rank with
    fewer appends empty ones (`[]`, a row without targets). A forward recomputes its activations when,
    on any rank, it holds more tokens than the budget (one row longer than it), so that all ranks
    checkpoint the same forwards.
    """

    def __init__(self, lengths: list[int], config: TrainConfig, *, world_size: int = 1, rank: int = 0):
        self.lengths = lengths
        self.config = config
        self.world_size, self.rank = world_size, rank
        self.per_step = config.grad_accum
        self.tokens_per_forward: int | None = config.max_tokens_per_forward or None
        """The token budget of one forward pass; None: no limit (setup resolves the automatic default)."""
        self.padded = not (config.packing or config.padding_free)
        """Whether micro-batches are padded (a forward costs rows x longest) or concatenated (the sum)."""
        self.filler_row = min(range(len(lengths)), key=lambda i: (lengths[i], i)) if lengths else 0
        """The row an empty forward runs without targets: the shortest, so it never exceeds the budget."""
        self._cached: tuple[int, list[list[int]]] | None = None  # the epoch in use and its batches
        self._steps_in_epoch: dict[int, int] = {}
        self._first_step = [0]  # the first step of each epoch, extended as epochs are reached

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one epoch (all ranks), in order."""
        if self._cached is None or self._cached[0] != epoch:
            c = self.config
            if c.packing:
                # A packed micro-batch holds as many tokens as a full padded one would.
                budget = c.batch_size * (c.max_length or max(self.lengths))
                batches = pack_rows(self.lengths, budget, seed=c.seed, epoch=epoch)
            else:
                batches = length_grouped_batches(self.lengths, c.batch_size, seed=c.seed, epoch=epoch)
            self._cached = (epoch, batches)
        return self._cached[1]

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in one epoch."""
        if epoch not in self._steps_in_epoch:
            self._steps_in_epoch[epoch] = math.ceil(len(self.epoch_batches(epoch)) / self.per_step)
        return self._steps_in_epoch[epoch]

    def total_steps(self) -> int:
        """Steps of the whole run: `max_steps`, or every step of `epochs` epochs."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        return sum(self.steps_in_epoch(epoch) for epoch in range(self.config.epochs))

    def global_batches(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the micro-batches of all ranks together) of optimizer step `step` (0-based)."""
        while self._first_step[-1] <= step:
            self._first_step.append(self._first_step[-1] + self.steps_in_epoch(len(self._first_step) - 1))
        epoch = bisect.bisect_right(self._first_step, step) - 1
        start = (step - self._first_step[epoch]) * self.per_step
        return epoch, self.epoch_batches(epoch)[start:start + self.per_step]

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, this rank's forward passes) of optimizer step `step` (0-based): its share of each
        micro-batch, split by the token budget when there is one."""
        epoch, forwards, _ = self.step_forwards(step)
        return epoch, forwards

    def step_forwards(self, step: int) -> tuple[int, list[list[int]], list[bool]]:
        """(epoch, this rank's forward passes, whether each recomputes its activations) of step `step`."""
        epoch, batches = self.global_batches(step)
        forwards: list[list[int]] = []
        recompute: list[bool] = []
        for batch in batches:
            splits = [split_by_tokens(rank_share(batch, self.lengths, self.world_size, r), self.lengths,
                                      self.tokens_per_forward, padded=self.padded) for r in range(self.world_size)]
            count = max(len(split) for split in splits)
            mine = splits[self.rank] + [[]] * (count - len(splits[self.rank]))
            forwards += mine
            recompute += [self.exceeds_budget([rank_split[k] for rank_split in splits if k < len(rank_split)])
                          for k in range(count)]
        return epoch, forwards, recompute

    def exceeds_budget(self, groups: list[list[int]]) -> bool:
        """Whether any of these row groups holds more tokens than the budget (it is then a single row)."""
        budget = self.tokens_per_forward
        return bool(budget) and any(forward_tokens(g, self.lengths, padded=self.padded) > budget for g in groups)


def step_denominator(batches: list[dict[str, torch.Tensor]], normalization: str,
                     instruction_weight: float = 0.0) -> float:
    """What the step's summed loss is divided by: its target count (token) or row count (sequence).

    The single place the denominator is computed; `step_counts` sums it over the ranks. With an
    instruction weight w, the token denominator is the sum of the weights, n_response + w * n_instruction
    (from the two counts, so it is the same number however the step is split), and the sequence one
    counts the rows with any target of nonzero weight.
    """
    if normalization != "token":
        return step_row_count(batches, instruction_weight)
    if not instruction_weight:
        return step_normalizer(batches)
    return step_normalizer(batches) + instruction_weight * sum(count_instruction_targets(b) for b in batches)


def step_counts(batches: list[dict[str, torch.Tensor]], normalization: str, tokens: int,
                parallel: Parallel, instruction_weight: float = 0.0) -> tuple[float, int, int, int]:
    """(denominator, trained tokens, tokens, instruction tokens) of the whole step, summed over the ranks
    in one all-reduce. Trained tokens are the response targets; instruction tokens those scored at the
    instruction weight w (0 when w is 0).

    Called before any backward pass: every rank divides its own loss sum by the global denominator.
    """
    if not instruction_weight:  # the masked loss: exactly as before the instruction weight existed
        denominator = step_denominator(batches, normalization)
        targets = denominator if normalization == "token" else step_normalizer(batches)
        return (*(int(value) for value in parallel.sum(denominator, targets, tokens)), 0)
    instruction = sum(count_instruction_targets(batch) for batch in batches)
    rows = step_row_count(batches, instruction_weight) if normalization != "token" else 0
    rows, targets, tokens, instruction = (int(v) for v in parallel.sum(rows, step_normalizer(batches), tokens,
                                                                        instruction))
    # The weight sum from the global integer counts: every rank, and any split of the step, gets the same number.
    denominator = targets + instruction_weight * instruction if normalization == "token" else rows
    return denominator, targets, tokens, instruction
