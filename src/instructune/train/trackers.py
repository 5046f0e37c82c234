"""Experiment trackers (`report_to`): every value of `metrics.jsonl` also goes to TensorBoard and/or trackio.

A tracker has two methods, `log(record)` (one `metrics.jsonl` record) and `close()`. Each numeric
value of a record becomes the scalar `<split>/<key>` (`train/loss`, `eval/accuracy`, ...) at the
record's `step`, so a tracker's series and `metrics.jsonl` hold the same numbers at the same steps.
Only the libraries' own writers are used:

- `tensorboard`: `torch.utils.tensorboard.SummaryWriter` into `<output_dir>/tensorboard/`.
- `trackio` (local-first): `trackio.init` / `Run.log` / `Run.finish`, project `instructune`, run named
  after the output folder. trackio keeps its SQLite database in `$TRACKIO_DIR` (its own setting,
  default `~/.cache/huggingface/trackio`); unless that is set, instructune points it at
  `<instructune cache>/trackio` (`$INSTRUCTUNE_CACHE/trackio`, default `~/.cache/instructune/trackio`),
  so one dashboard shows every run: `TRACKIO_DIR=~/.cache/instructune/trackio trackio show --project instructune`.
  trackio reads the variable once, when it is first imported; a process that imported it already
  keeps its location.

A tracker opens afresh and is handed the records `metrics.jsonl` already holds (none for a new run;
on resume, the steps up to the checkpoint): a resumed run's trackers show each step once, exactly as
`metrics.jsonl` does, even if the interrupted run reported elsewhere or not at all. For trackio,
that means an earlier trackio run of the same output folder is deleted and written again.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from instructune.errors import UserError

TRACKERS = ("tensorboard", "trackio")
"""What `report_to` may name (besides `none`); each is the pip extra that installs it."""
TENSORBOARD_DIR = "tensorboard"
TRACKIO_PROJECT = "instructune"


def check_report_to(value: Any) -> str | list[str]:
    """`report_to` normalised: `"none"`, one tracker's name, or a list of several (ValueError if wrong)."""
    if isinstance(value, str) and "," in value:  # report_to=tensorboard,trackio on the command line
        value = value.split(",")
    names = [value] if value is None or isinstance(value, str) else value
    expected = f"expected none, {', '.join(TRACKERS[:-1])} or {TRACKERS[-1]}, or a list of them, got {value!r}"
    if not isinstance(names, list) or not all(name is None or isinstance(name, str) for name in names):
        raise ValueError(expected)
    names = [str(name).strip().lower() if name is not None else "none" for name in names]
    if any(name not in (*TRACKERS, "none") for name in names):
        raise ValueError(expected)
    if "none" in names and len(names) > 1:
        raise ValueError(f"none cannot be combined with a tracker, got {value!r}")
    chosen = list(dict.fromkeys(name for name in names if name != "none"))  # in order, once each
    if not chosen:
        return "none"
    return chosen[0] if len(chosen) == 1 else chosen


def tracker_names(report_to: str | list[str]) -> list[str]:
    """The trackers a (checked) `report_to` asks for, in order; [] for none."""
    return [] if report_to == "none" else [report_to] if isinstance(report_to, str) else list(report_to)


class Tracker(Protocol):
    """Where metric records go besides `metrics.jsonl`."""

    note: str
    """One line for the console: where the tracker writes and how to look at it."""

    def log(self, record: dict[str, Any]) -> None:
        """Send one `metrics.jsonl` record."""

    def close(self) -> None:
        """Flush and finish."""


def scalars(record: dict[str, Any]) -> dict[str, int | float]:
    """A record's numeric values as `<split>/<key>` tags (the step is where they go, not a value)."""
    split = record.get("split", "train")
    return {f"{split}/{key}": value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def require_trackers(report_to: str | list[str]) -> None:
    """Import each chosen tracker's library now, before any training: a missing one is a `UserError`."""
    for name in tracker_names(report_to):
        try:
            _import(name)
        except ImportError:
            raise UserError(f"report_to: {name} needs the {name} package; install it with "
                            f"pip install 'instructune[{name}]' (or set report_to: none)") from None


def _import(name: str):
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
        from instructune.cache import cache_dir

        os.environ["TRACKIO_DIR"] = str(cache_dir() / "trackio")  # read by trackio at its import
    import trackio

    return trackio


def open_trackers(report_to: str | list[str], output_dir: Path, *, config: dict[str, Any],
                  earlier: Iterable[dict[str, Any]] = ()) -> list[Tracker]:
    """Open the trackers `report_to` names for the run in `output_dir` and hand them the `earlier` records."""
    require_trackers(report_to)
    earlier = list(earlier)
    trackers: list[Tracker] = []
    try:
        for name in tracker_names(report_to):
            tracker = TensorBoardTracker(output_dir) if name == "tensorboard" else TrackioTracker(output_dir, config)
            trackers.append(tracker)
            for record in earlier:
                tracker.log(record)
    except BaseException:
        close_all(trackers)
        raise
    return trackers


def close_all(trackers: Iterable[Tracker]) -> None:
    """Close every tracker, even when one fails to (the first failure is raised afterwards)."""
    failure = None
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as error:  # noqa: BLE001 - the others still deserve their close
            failure = failure or error
    if failure is not None:
        raise failure


class TensorBoardTracker:
    """Scalars into `<output_dir>/tensorboard/` with torch's `SummaryWriter`."""

    def __init__(self, output_dir: Path):
        writer_class = _import("tensorboard")
        self.folder = Path(output_dir) / TENSORBOARD_DIR
        shutil.rmtree(self.folder, ignore_errors=True)  # rewritten from metrics.jsonl: each step once
        self.writer = writer_class(log_dir=str(self.folder))
        self.note = f"tensorboard: tensorboard --logdir {self.folder}"

    def log(self, record: dict[str, Any]) -> None:
        """Add each numeric value of `record` as a scalar at its step."""
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        """Write everything out and close the event file."""
        self.writer.close()


class TrackioTracker:
    """A trackio run (project `instructune`, named after the output folder) with the run's configuration."""

    def __init__(self, output_dir: Path, config: dict[str, Any]):
        trackio = _import("trackio")
        self.name = Path(output_dir).name
        self.config = {**config, "output_dir": str(Path(output_dir).resolve())}
        self._delete_earlier(trackio)
        with _quiet():  # trackio's own banner names a `trackio show` that would miss $TRACKIO_DIR
            self.run = trackio.init(project=TRACKIO_PROJECT, name=self.name, config=self.config, embed=False)
        where = self.run.url or trackio.utils.TRACKIO_DIR
        self.note = (f"trackio: project {TRACKIO_PROJECT}, run {self.name} in {where}"
                     + ("" if self.run.url else
                        f"; view with TRACKIO_DIR={where} trackio show --project {TRACKIO_PROJECT}"))

    def _delete_earlier(self, trackio) -> None:
        """Delete the local trackio runs of this output folder: the kept records are about to be logged again."""
        try:
            runs = list(trackio.Api().runs(TRACKIO_PROJECT))
        except ValueError:  # no such project yet
            return
        for run in runs:
            if run.name == self.name and (run.config or {}).get("output_dir") == self.config["output_dir"]:
                run.delete()

    def log(self, record: dict[str, Any]) -> None:
        """Log each numeric value of `record` at its step."""
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        """Finish the run (trackio writes its queue to the database)."""
        with _quiet():
            self.run.finish()


@contextlib.contextmanager
def _quiet():
    """Keep a library's progress prints off stdout (its warnings still show)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
