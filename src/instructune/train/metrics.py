"""Where the numbers of a run go: `metrics.jsonl`, the trackers of `report_to`, a loss-curve PNG.

`metrics.jsonl` holds one JSON object per line: one per optimizer step (`"split": "train"`) and
one per evaluation (`"split": "eval"`). Each line is flushed as it is written, so a killed run
keeps every step it finished; on resume the lines after the checkpoint's step are dropped, so the
file continues exactly where the checkpoint stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from instructune.disk import disk_full_error, is_disk_full
from instructune.train.trackers import close_all, open_trackers

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a run's `metrics.jsonl` (a half-written last line is ignored)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the tail a kill cut short
    return records


class MetricsLogger:
    """Appends metric records to `metrics.jsonl` and sends them to the trackers of `report_to`.

    The trackers open afresh and first get the records the file keeps (on resume, the steps up to the
    checkpoint), so they always hold what `metrics.jsonl` holds (see `instructune.train.trackers`).
    """

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int | None = None,
                 report_to: str | list[str] = "none", config: dict[str, Any] | None = None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self.trackers = open_trackers(report_to, self.output_dir, config=config or {},
                                      earlier=read_metrics(self.output_dir))
        self._file = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to `step`: steps after it are about to be trained again."""
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        text = "".join(json.dumps(r) + "\n" for r in kept)
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if is_disk_full(error):
                raise disk_full_error(self.path, len(text.encode())) from None
            raise

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (it must carry `step` and `split`); on a full disk, a `UserError` and the file
        cut back to its last whole line."""
        line = json.dumps(record) + "\n"
        end = self._file.tell()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            self._cut_back(end)
            if is_disk_full(error):
                raise disk_full_error(self.path, len(line), hint="free some space, then continue with resume=true "
                                      "(the newest checkpoint is intact)") from None
            raise
        for tracker in self.trackers:
            tracker.log(record)

    def _cut_back(self, end: int) -> None:
        """Drop what a failed write left after byte `end`, and open the file afresh (its buffer is stuck)."""
        try:
            self._file.close()
        except OSError:
            pass  # closing flushes the stuck buffer again, and fails again: the bytes are dropped below
        os.truncate(self.path, end)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Flush and close the outputs."""
        self._file.close()
        close_all(self.trackers)


def loss_curves(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (step, loss) points `loss.png` draws: training steps, and evaluations (step 0: before training)."""
    # With an instruction weight `loss` is the weighted loss; the response loss keeps curves comparable.
    train = [(r["step"], r.get("response_loss", r["loss"])) for r in records
             if r.get("split") == "train" and _finite(r.get("response_loss", r.get("loss")))]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and _finite(r.get("loss"))]
    return train, evals


def plot_losses(output_dir: str | os.PathLike) -> Path | None:
    """Draw the training (and evaluation) loss against the step into `loss.png`; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is the optional `plot` extra
        return None
    train, evals = loss_curves(read_metrics(output_dir))
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class ProgressReporter:
    """A progress bar (loss, tokens/s, ETA) on a terminal; elsewhere a line every `log_every` steps.

    The loss shown is a windowed running mean: the plain mean of the last `log_every` steps' losses
    (fewer at the start and after a resume), so a line summarises exactly the steps since the one
    before it and one unlucky batch does not make it jump. `metrics.jsonl` keeps each step's own loss.
    """

    def __init__(self, console, total_steps: int, start_step: int, start_tokens: int, log_every: int):
        self.console = console
        self.total = total_steps
        self.start_step = start_step
        self.start_tokens = start_tokens
        self.log_every = log_every
        self.recent: deque[float] = deque(maxlen=max(1, log_every))
        """The losses of the last `log_every` steps."""
        self.started = time.perf_counter()
        self.bar = None
        if console.is_terminal and start_step < total_steps:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, loss="-", speed="-")

    @property
    def mean_loss(self) -> float:
        """The mean loss of the last `log_every` steps (NaN before the first)."""
        return math.fsum(self.recent) / len(self.recent) if self.recent else math.nan

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Show the state after optimizer step `step` (1-based) from its metrics record."""
        elapsed = time.perf_counter() - self.started
        speed = (record["tokens"] - self.start_tokens) / max(elapsed, 1e-9)  # this session's average
        self.recent.append(record["loss"])
        loss = f"{self.mean_loss:.4f}" + (f" (mean of {len(self.recent)} steps)" if len(self.recent) > 1 else "")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, speed=f"{speed:,.0f}")
        elif step % self.log_every == 0 or step == self.total:
            eta = elapsed / (step - self.start_step) * (self.total - step)
            self.console.print(
                f"step {step}/{self.total}  loss {loss}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  {speed:,.0f} tok/s  elapsed {_clock(record['elapsed_s'])}"
                f"  ETA {_clock(eta)}", markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """Print a line (above the bar, when there is one)."""
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the bar."""
        if self.bar is not None:
            self.bar.stop()


def _clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"
