"""The progress output: a running mean of the loss, while metrics.jsonl keeps each step's own."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from instructune.train.metrics import ProgressReporter

LOSSES = [4.0, 0.0, 4.0, 0.0, 1.0, 1.0, 1.0, 5.0, 9.0, 3.0]


def _record(step: int, loss: float) -> dict:
    return {"split": "train", "step": step, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens": 100 * step,
            "elapsed_s": float(step)}


def test_progress_lines_show_the_mean_of_the_last_log_every_steps():
    out = io.StringIO()
    reporter = ProgressReporter(Console(file=out, width=200), total_steps=len(LOSSES), start_step=0,
                                start_tokens=0, log_every=4)
    for step, loss in enumerate(LOSSES, start=1):
        reporter.update(step, _record(step, loss))
    reporter.close()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    # Steps 1-4 (4, 0, 4, 0) and 5-8 (1, 1, 1, 5) both average 2, whatever the last step's own loss was.
    assert "loss 2.0000 (mean of 4 steps)" in lines[0] and "loss 2.0000 (mean of 4 steps)" in lines[1]
    assert "loss 4.5000 (mean of 4 steps)" in lines[2]  # steps 7-10: the window slides


def test_the_window_restarts_on_resume_and_the_bar_shows_the_mean_too():
    reporter = ProgressReporter(Console(file=io.StringIO(), force_terminal=True, width=120), total_steps=20,
                                start_step=10, start_tokens=1000, log_every=3)
    try:
        reporter.update(11, _record(11, 3.0))
        assert reporter.mean_loss == 3.0
        assert reporter.bar.tasks[0].fields["loss"] == "3.0000"  # one step: nothing to average yet
        for step, loss in ((12, 1.0), (13, 2.0), (14, 6.0)):
            reporter.update(step, _record(step, loss))
        assert reporter.mean_loss == pytest.approx(3.0)
        assert reporter.bar.tasks[0].fields["loss"] == "3.0000 (mean of 3 steps)"
    finally:
        reporter.close()
