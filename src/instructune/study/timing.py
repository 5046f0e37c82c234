"""Paired step timing for `instructune compare`: what masking saves, measured so that machine load cancels.

The two runs' own step times (in their `metrics.jsonl`) are taken minutes apart, and on a shared
machine the load can change in between by more than masking saves. Here one model times forward and
backward of the *same* micro-batches with the masked and with the unmasked labels, alternating, and
alternating which of the two goes first, so both see the same load; the ratio of each pair is kept.
The optimizer step is left out: it costs the same for both, and taking it would change the weights.
"""

from __future__ import annotations

import statistics
import time

import torch

from instructune.data.encoded import EncodedRow
from instructune.train.loss import masked_lm_loss, step_normalizer


def _forward_backward_seconds(run, rows: list[EncodedRow], groups: list[list[int]]) -> float:
    """Seconds for one step's forward and backward passes over `rows` (no optimizer step)."""
    from instructune.train.loop import collate_rows

    batches = [{k: v.to(run.device) for k, v in collate_rows(run, [rows[i] for i in group]).items()}
               for group in groups]
    _synchronize(run.device)
    start = time.perf_counter()
    denominator = step_normalizer(batches)
    for batch in batches:
        (masked_lm_loss(run.model, batch).loss_sum / denominator).backward()
    _synchronize(run.device)
    seconds = time.perf_counter() - start
    run.model.zero_grad(set_to_none=True)
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_step_times(run, masked_rows: list[EncodedRow], *, pairs: int = 6) -> dict:
    """Time the first `pairs` steps of `run.plan` with `masked_rows` and with `run.train_rows`, alternately.

    The two row lists must hold the same tokens (they differ in labels only). Leaves the weights,
    gradients and random state as they were.
    """
    steps = min(pairs, run.plan.total_steps())
    times: dict[str, list[float]] = {"masked": [], "unmasked": []}
    labelled = {"masked": masked_rows, "unmasked": run.train_rows}
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _forward_backward_seconds(run, run.train_rows, run.plan.step(0)[1])  # warm-up, not counted
        for step in range(steps):
            groups = run.plan.step(step)[1]
            order = ("masked", "unmasked") if step % 2 == 0 else ("unmasked", "masked")
            for name in order:
                times[name].append(_forward_backward_seconds(run, labelled[name], groups))
    ratios = [m / u for m, u in zip(times["masked"], times["unmasked"], strict=True)]
    return {"pairs": steps, "masked_s": times["masked"], "unmasked_s": times["unmasked"],
            "median_ratio": statistics.median(ratios)}
