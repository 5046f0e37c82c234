"""Stopping a run politely: SIGTERM or SIGINT ends it after the current step, with a checkpoint to resume.

A cluster that preempts a job sends SIGTERM (and SIGKILL some seconds later); a person presses Ctrl-C
(SIGINT). Either way, while the steps run (`GracefulStop` around them):

1. the first signal is only noted: the step under way finishes, the run writes the checkpoint of that
   step (unless it has just written it), prints how to resume and raises `TrainingStopped`, which the
   command line turns into exit status `STOPPED_EXIT_STATUS` (75, EX_TEMPFAIL: "try again later");
2. a second signal stops at once (`TrainingInterrupted`, exit status 128 + the signal's number, as the
   shell reports a process a signal ended). A checkpoint being written then is abandoned whole: it is
   written under a temporary name and removed (`checkpoint.save_checkpoint`), so the previous one is
   the newest and nothing is left half-written under a checkpoint's name.

With several ranks, each rank's "a signal came" rides in the step's one all-reduce (`Parallel.sum`), so
every rank reads the same answer after the same step and they all stop there together, whichever of
them got the signal and when. torchrun passes a SIGTERM or SIGINT it receives to every rank and waits
30 s for them before killing them; a step and a checkpoint must fit in that time.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

STOPPED_EXIT_STATUS = 75
"""The exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL: resumable)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(KeyboardInterrupt):
    """A run stopped by a signal after finishing a step and writing its checkpoint; `str()` says how to resume."""

    exit_status = STOPPED_EXIT_STATUS

    def __init__(self, message: str, *, step: int, checkpoint: Path):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """A second signal: the run stopped at once, in the middle of whatever it was doing."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signal_number).name}: the newest complete "
                         "checkpoint is intact; resume=true continues from it")
        self.exit_status = 128 + signal_number


class GracefulStop:
    """While entered (in the main thread), SIGTERM and SIGINT ask for a stop instead of ending the process.

    `requested` holds the first signal's name; a second signal raises `TrainingInterrupted` where the
    main thread is. Off the main thread (where Python cannot handle signals) it does nothing.
    """

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        """Say nothing when the first signal comes (ranks other than 0)."""
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT from now on (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        """Give the signals back to the handlers they had."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, number: int, _frame) -> None:
        if self.requested is not None:
            raise TrainingInterrupted(number)
        self.requested = signal.Signals(number).name
        if not self.quiet:
            print(f"\n{self.requested} received: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the `instructune train` command line with `resume=true`."""
    argv = sys.argv if argv is None else argv
    try:
        start = argv.index("train")
    except ValueError:
        return "train the same configuration again with resume=true"
    kept = [arg for arg in argv[start + 1:] if not arg.startswith(("resume=", "overwrite="))]
    command = shlex.join(["instructune", "train", *kept, "resume=true"])
    if "LOCAL_RANK" in os.environ:
        return f"the same torchrun command with resume=true ({command})"
    return command
