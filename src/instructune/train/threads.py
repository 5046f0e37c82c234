"""How many threads a CPU training step uses: the cores other processes leave free.

OpenMP threads meet at a barrier after every parallel region, so on a core shared with a busy
neighbour each barrier waits for the scheduler to give the descheduled thread its turn. Measured on
the project's 2-core AMD EPYC, the default job's model and rows (10 steps, tokens/s of steps 2-10):

    background busy processes    2 threads    1 thread
    none                            102           65
    one                              31           62

With this governor: 104 idle and 66 beside one busy process. A changed thread count may change the
last bits of a step's sums, so a run that must be bitwise reproducible pins it with OMP_NUM_THREADS.

So a step should use as many threads as there are free cores, and that changes while a run goes on.
`ThreadGovernor` measures, every `every_s` seconds between steps, how much CPU other processes used
(all CPU time in /proc/stat minus this process's own) and sets torch's thread count to the free cores.
It stays out of the way when the user chose a count (`OMP_NUM_THREADS`), off Linux, and off the CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_cpu_busy_s(path: str = "/proc/stat") -> float | None:
    """Seconds of CPU time every core has spent busy since boot (all processes), or None when unknown."""
    try:
        with open(path, encoding="ascii") as file:
            fields = file.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice, so only the first eight fields add up
    return (sum(values[:8]) - idle) / _CLOCK_TICKS


def threads_for(others_busy_cores: float, cores: int) -> int:
    """The thread count for `cores` cores when other processes keep `others_busy_cores` of them busy."""
    return max(1, min(cores, int(cores - others_busy_cores + 0.5)))


class ThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave free, re-measured as it runs."""

    def __init__(self, cores: int, *, every_s: float = 10.0, set_threads: Callable[[int], None] | None = None,
                 read_busy: Callable[[], float | None] = read_cpu_busy_s,
                 own_cpu_s: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic):
        self.cores = cores
        self.every_s = every_s
        self._set_threads = set_threads or _set_torch_threads
        self._read_busy, self._own_cpu_s, self._clock = read_busy, own_cpu_s, clock
        self.threads = cores
        self._last = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._read_busy(), self._own_cpu_s()

    def update(self) -> int | None:
        """Call between steps; returns the new thread count when it changed, else None."""
        now = self._clock()
        if now - self._last[0] < self.every_s:
            return None
        sample = self._sample()
        (then, busy_then, own_then), (_, busy_now, own_now) = self._last, sample
        self._last = sample
        if busy_then is None or busy_now is None or now <= then:
            return None
        others = max(0.0, (busy_now - busy_then) - (own_now - own_then)) / (now - then)
        threads = threads_for(others, self.cores)
        if threads == self.threads:
            return None
        self.threads = threads
        self._set_threads(threads)
        return threads


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def cpu_thread_governor(device_type: str) -> ThreadGovernor | None:
    """A governor for a CPU run, or None when the user set OMP_NUM_THREADS, off Linux, or on a GPU."""
    if device_type != "cpu" or "OMP_NUM_THREADS" in os.environ or read_cpu_busy_s() is None:
        return None
    import torch

    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    return ThreadGovernor(cores) if cores > 1 else None
