"""The thread governor: as many threads as the cores other processes leave free."""

from __future__ import annotations

from instructune.train.threads import _CLOCK_TICKS, ThreadGovernor, read_cpu_busy_s, threads_for


def test_threads_for_free_cores():
    assert threads_for(0.0, 2) == 2
    assert threads_for(0.1, 2) == 2
    assert threads_for(0.67, 2) == 1  # one busy loop sharing 2 cores with our 2 threads gets ~2/3 of a core
    assert threads_for(1.0, 2) == 1
    assert threads_for(1.9, 2) == 1  # never fewer than one
    assert threads_for(1.2, 8) == 7


class _FakeMachine:
    """/proc/stat busy seconds, this process's CPU seconds and a clock, advanced by hand."""

    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0.0, 0.0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


def _governor(machine: _FakeMachine, chosen: list[int]) -> ThreadGovernor:
    return ThreadGovernor(2, every_s=10, set_threads=chosen.append, read_busy=lambda: machine.busy,
                          own_cpu_s=lambda: machine.own, clock=lambda: machine.now)


def test_governor_drops_to_one_thread_under_a_busy_neighbour_and_comes_back():
    machine, chosen = _FakeMachine(), []
    governor = _governor(machine, chosen)
    machine.run(5, own_cores=1.33, other_cores=0.67)
    assert governor.update() is None  # not yet time to measure
    machine.run(6, own_cores=1.33, other_cores=0.67)
    assert governor.update() == 1 and chosen == [1]
    machine.run(11, own_cores=1.0, other_cores=1.0)
    assert governor.update() is None  # still busy: no change
    machine.run(11, own_cores=1.0, other_cores=0.02)  # the neighbour stopped
    assert governor.update() == 2 and chosen == [1, 2]


def test_governor_ignores_an_unreadable_proc_stat(tmp_path):
    assert read_cpu_busy_s(str(tmp_path / "missing")) is None
    chosen: list[int] = []
    governor = ThreadGovernor(2, every_s=0, set_threads=chosen.append, read_busy=lambda: None)
    assert governor.update() is None and chosen == []


def test_proc_stat_is_read_as_busy_seconds(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 25 0 0 0 0 0\ncpu0 50 0 25 500 10 0 0 0 0 0\n")
    busy = read_cpu_busy_s(str(stat))
    assert busy == 150 / _CLOCK_TICKS  # user + system; idle and iowait are not busy
