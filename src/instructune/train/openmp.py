"""How long idle OpenMP threads spin before they sleep: set before torch loads OpenMP.

On a CPU that nothing else uses, spinning threads answer the next parallel region at once; on a
shared or busy CPU a spinning thread burns the time slice its descheduled peer needs, and every
barrier then waits for the scheduler. Measured on the project's 2-core machine, SmolLM2-135M
training (workload A of bench/train_bench.py, tokens/s):

    OpenMP wait policy            idle machine   one busy process beside it
    libgomp default (spin ~300k)       274               62
    OMP_WAIT_POLICY=PASSIVE            255              144
    GOMP_SPINCOUNT=20000               270              121

A bounded spin keeps nearly all of the idle-machine speed and most of the busy-machine one.
"""

from __future__ import annotations

import os

SPIN_COUNT = "20000"


def bound_openmp_spinning() -> None:
    """Cap libgomp's spin-wait (GOMP_SPINCOUNT) unless the user chose a policy; call before importing torch."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
