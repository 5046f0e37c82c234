"""Progress lines while a model answers: count, rate and an ETA, not too often, and a last line."""

from __future__ import annotations

import io

from rich.console import Console

from instructune.use.answer_progress import AnswerProgress
from instructune.use.generation import GenerationProgress


def lines_of(every_s: float, steps: list[GenerationProgress]) -> list[str]:
    out = io.StringIO()
    progress = AnswerProgress(Console(file=out, width=200), "answering with the base model", 62, every_s=every_s)
    for step in steps:
        progress(step)
    return out.getvalue().splitlines()


def test_a_line_gives_the_count_the_rate_and_the_eta(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])  # started; after step 10; after the last step
    monkeypatch.setattr("instructune.use.answer_progress.time.perf_counter", lambda: next(clock))
    lines = lines_of(0, [GenerationProgress(62, 5, 600, 10, 40), GenerationProgress(62, 62, 1500, 30, 30)])
    assert lines == ["answering with the base model: 62 questions ...",
                     # 10 s for 10 steps: the 30 steps left take at most 30 s.
                     "answering with the base model: 5/62 answered, 60 tokens/s, ETA ≤ 0:30",
                     "answering with the base model: 62/62 answered in 30 s (2.07 questions/s, 50 tokens/s)"]


def test_lines_come_at_most_every_interval_but_the_last_always():
    steps = [GenerationProgress(62, 0, 62 * k, k, 40) for k in range(1, 40)] + [GenerationProgress(62, 62, 2480, 40, 40)]
    lines = lines_of(3600, steps)
    assert len(lines) == 2 and lines[-1].startswith("answering with the base model: 62/62 answered in ")
