"""Progress lines while a model answers a set of questions: how many are answered, how fast, how long is left.

On a slow CPU the default job's answering takes minutes; `AnswerProgress` is the `on_step` callback of
`generation.answer_conversations` and prints a line when it starts, at most every `every_s` seconds
after that, and when every question is answered.
"""

from __future__ import annotations

import time

from instructune.use.generation import GenerationProgress


class AnswerProgress:
    """Prints `LABEL: 12/62 answered, 140 tokens/s, ETA ≤ 0:21` lines to a rich console."""

    def __init__(self, console, label: str, total: int, *, every_s: float = 10.0):
        self.console, self.label, self.total, self.every_s = console, label, total, every_s
        self.started = self.shown = time.perf_counter()
        self._print(f"{label}: {total} questions ...")

    def __call__(self, progress: GenerationProgress) -> None:
        """After a decoding step: a line when `every_s` passed since the last one, or when all are answered."""
        now = time.perf_counter()
        finished = progress.answered >= progress.prompts
        if not finished and now - self.shown < self.every_s:
            return
        self.shown, elapsed = now, max(now - self.started, 1e-9)
        if finished:
            self._print(f"{self.label}: {progress.prompts}/{progress.prompts} answered in {elapsed:.0f} s "
                        f"({progress.prompts / elapsed:.2f} questions/s, {progress.tokens / elapsed:.0f} tokens/s)")
            return
        # Every remaining step costs about what the steps so far cost on average; steps a batch does not
        # need (all its answers stopped) are not taken, hence "at most".
        eta = elapsed / max(progress.steps, 1) * (progress.max_steps - progress.steps)
        self._print(f"{self.label}: {progress.answered}/{progress.prompts} answered, "
                    f"{progress.tokens / elapsed:.0f} tokens/s, ETA ≤ {_clock(eta)}")

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


def _clock(seconds: float) -> str:
    """`m:ss`."""
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
