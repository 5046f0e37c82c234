"""Which rows each optimizer step trains on, and what the step's summed loss is divided by.

Both are pure functions of their inputs, so a resumed run recomputes exactly the batches and the
denominators the interrupted run would have used, on any number of ranks.
"""

from __future__ import annotations

import bisect
import math

import torch

from instructune.data.batching import length_grouped_batches, pack_rows
from instructune.train.config import TrainConfig
from instructune.train.distributed import Parallel, rank_share
from instructune.train.loss import step_normalizer, step_row_count


class StepPlan:
    """The micro-batches of every optimizer step, as row indices: a pure function of (seed, epoch, step).

    Each epoch's micro-batches come from length-grouped shuffled blocks (or packed bins with
    `packing`); a step takes `grad_accum` of them, and an epoch's last step may take fewer. With
    `max_steps` beyond the data, epochs simply continue. Ranks: the micro-batches are the same whatever
    `world_size` is (they are the global batch); rank r keeps its `rank_share` of each, which may be
    empty, so every rank runs the same number of micro-batches.
    """

    def __init__(self, lengths: list[int], config: TrainConfig, *, world_size: int = 1, rank: int = 0):
        self.lengths = lengths
        self.config = config
        self.world_size, self.rank = world_size, rank
        self.per_step = config.grad_accum
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

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, this rank's micro-batches) of optimizer step `step` (0-based)."""
        while self._first_step[-1] <= step:
            self._first_step.append(self._first_step[-1] + self.steps_in_epoch(len(self._first_step) - 1))
        epoch = bisect.bisect_right(self._first_step, step) - 1
        start = (step - self._first_step[epoch]) * self.per_step
        batches = self.epoch_batches(epoch)[start:start + self.per_step]
        return epoch, [rank_share(batch, self.lengths, self.world_size, self.rank) for batch in batches]


def step_denominator(batches: list[dict[str, torch.Tensor]], normalization: str) -> int:
    """What the step's summed loss is divided by: its target count (token) or row count (sequence).

    The single place the denominator is computed; `step_counts` sums it over the ranks.
    """
    return step_normalizer(batches) if normalization == "token" else step_row_count(batches)


def step_counts(batches: list[dict[str, torch.Tensor]], normalization: str, tokens: int,
                parallel: Parallel) -> tuple[int, int, int]:
    """(denominator, trained tokens, tokens) of the whole step, summed over the ranks in one all-reduce.

    Called before any backward pass: every rank divides its own loss sum by the global denominator.
    """
    denominator = step_denominator(batches, normalization)
    targets = denominator if normalization == "token" else step_normalizer(batches)
    return tuple(int(value) for value in parallel.sum(denominator, targets, tokens))
