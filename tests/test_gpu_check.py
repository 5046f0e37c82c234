"""`bench/gpu_check.sh --dry-run`: the GPU check's steps on the CPU with a tiny model, so that CI runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / "bench" / "train_bench.py").is_file(), reason="needs the repository's bench/")
def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHON": sys.executable, "INSTRUCTUNE_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "device: CPU (dry run)" in out
    assert "needs a CUDA GPU" in out  # the CUDA-marked tests were collected and skipped with the reason
    for workload in ("workload A:", "workload B:"):
        assert workload in out
    assert "instructune vs trl " in out and "gpu_check done" in out
