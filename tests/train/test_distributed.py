"""Data parallelism under real `torchrun` on CPU (gloo, 2 ranks on the 2 cores) with the tiny model.

2 ranks x 2 rows equal 1 rank x 4 rows step for step; resuming works on the same and on a different
number of ranks; FSDP2 matches too; a rank with an empty share never hangs; a killed or stuck rank
ends the job with an error in bounded time.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from instructune.data.batching import collate_padded
from instructune.train.checkpoint import latest_checkpoint
from instructune.train.config import load_config
from instructune.train.distributed import rank_share, without_targets
from instructune.train.loop import fit, setup_run, train
from instructune.train.loss import masked_lm_loss
from instructune.train.metrics import read_metrics
from train_fixtures import rank_pids, train_records, write_tiny_model, write_toy_data

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
needs_proc = pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' processes through /proc")

# 41 training rows in micro-batches of 4: one micro-batch has a single row, so rank 1's share of it is
# empty; the 4 evaluation rows make one batch, so rank 1 evaluates nothing either.
# Every checkpoint keeps its optimizer state: `cut_back` makes an older one the newest, as a kill would.
SETTINGS = {"batch_size": 4, "grad_accum": 2, "lr": 1e-2, "epochs": 1, "eval_fraction": 0.08, "eval_every": 2,
            "save_every": 2, "keep_last": 10, "log_every": 1, "dist_timeout_s": 60, "save_optimizer": "all"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model, data = write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl", rows=45)
    one_row = write_toy_data(root / "one_row.jsonl", rows=1)
    lines = [f"model: {model}", f"data: {data}"] + [f"{key}: {value}" for key, value in SETTINGS.items()]
    (root / "run.yaml").write_text("\n".join(lines) + "\n")
    return root, one_row


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(root / "cache")}


def _torchrun(root: Path, *overrides: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "instructune", "train", str(root / "run.yaml"), *overrides]


def torchrun(root: Path, *overrides: str, ranks: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(_torchrun(root, *overrides, ranks=ranks), env=_env(root), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def train_in_process(root: Path, *overrides: str):
    return train(load_config(root / "run.yaml", list(overrides)))


@pytest.fixture(scope="module")
def reference(work):
    """One process, 4 rows per micro-batch: the run every distributed run must reproduce."""
    root, _ = work
    run = setup_run(load_config(root / "run.yaml", [f"output_dir={root / 'one'}"]))
    fit(run)
    return root / "one", run


@pytest.fixture(scope="module")
def two_ranks(work):
    root, _ = work
    return root / "two", torchrun(root, f"output_dir={root / 'two'}")


def final_weights(output_dir: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(output_dir) / file)


def assert_same_run(actual: Path, expected: Path, *, exact: bool = False) -> None:
    """The same metrics records (counts exactly, losses to float rounding) and the same final weights."""
    got, want = train_records(actual), train_records(expected)
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
    if exact:
        assert got == want
    for a, b in zip(got, want, strict=True):
        for key in b:
            if isinstance(b[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (b["step"], key, a[key], b[key])
            else:
                assert a[key] == b[key], (b["step"], key)
    weights, expected_weights = final_weights(actual), final_weights(expected)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        if exact:
            assert torch.equal(weights[name], tensor), name
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def cut_back(source: Path, target: Path, step: int) -> Path:
    """A copy of a finished run as if it had been killed just after writing `checkpoint-<step>`."""
    shutil.copytree(source, target)
    for checkpoint in target.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    return target


# ---------------------------------------------------------------------------------------------------
# Pure pieces

def test_rank_share_splits_a_micro_batch_by_tokens_deterministically():
    lengths = [10, 3, 7, 7, 2]
    shares = [rank_share([0, 1, 2, 3, 4], lengths, 2, r) for r in (0, 1)]
    assert shares == [[0, 1, 4], [2, 3]]  # 15 and 14 tokens; each share keeps the batch's order
    assert rank_share([0, 1, 2, 3, 4], lengths, 1, 0) == [0, 1, 2, 3, 4]
    assert [rank_share([3, 1], lengths, 3, r) for r in range(3)] == [[3], [1], []]  # fewer rows than ranks


def test_a_share_without_targets_is_a_zero_that_still_reaches_every_parameter(work):
    from instructune.model.load import load_model

    root, _ = work
    model = load_model(str(root / "model"))
    batch = without_targets(collate_padded([{"input_ids": [3, 10, 20, 4], "labels": [-100, -100, 20, 4]}], 0))
    out = masked_lm_loss(model, batch)
    out.loss_sum.backward()
    assert out.num_targets == 0 and out.loss_sum.item() == 0.0
    # Every parameter gets a (zero) gradient, so DDP's and FSDP's backward hooks fire on an idle rank too.
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Runs under torchrun

def test_two_ranks_of_two_rows_equal_one_rank_of_four(reference, two_ranks):
    (one, run), (two, done) = reference, two_ranks
    steps = run.plan.total_steps()
    assert any(len(batch) == 1 for s in range(steps) for batch in run.plan.step(s)[1])  # an empty share
    assert len(run.eval_rows) <= run.config.batch_size  # rank 1 has no evaluation batch
    assert_same_run(two, one)
    # Rank 0 alone printed and wrote: the same files as one process, each line once.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("final training loss") == 1 and done.stdout.count(f"step {steps}/{steps}") == 1


def test_resume_on_the_same_number_of_ranks_is_exact(work, two_ranks, tmp_path):
    root, _ = work
    two, _ = two_ranks
    resumed = cut_back(two, tmp_path / "resumed", step=2)
    done = torchrun(root, f"output_dir={resumed}", "resume=true")
    assert "resuming from" in done.stdout and "rank(s)" not in done.stdout
    assert_same_run(resumed, two, exact=True)


def test_a_two_rank_checkpoint_resumes_on_one_process(work, reference, two_ranks, tmp_path, capsys):
    root, _ = work
    resumed = cut_back(two_ranks[0], tmp_path / "resumed", step=4)
    train_in_process(root, f"output_dir={resumed}", "resume=true")
    assert "written on 2 rank(s), this run has 1" in capsys.readouterr().out
    assert_same_run(resumed, reference[0])


def test_fsdp_resumes_a_one_process_checkpoint_on_two_ranks_and_matches_it(work, reference, tmp_path):
    root, _ = work
    one, _ = reference
    resumed = cut_back(one, tmp_path / "resumed", step=2)
    done = torchrun(root, f"output_dir={resumed}", "resume=true", "distributed=fsdp")
    assert "written on 1 rank(s), this run has 2" in done.stdout
    # Steps 3 to 6 ran sharded; the checkpoints they wrote hold the full weights and optimizer state.
    assert_same_run(resumed, one)
    assert (torch.load(latest_checkpoint(resumed) / "optimizer.pt", weights_only=True)["state"].keys()
            == torch.load(latest_checkpoint(one) / "optimizer.pt", weights_only=True)["state"].keys())


# ---------------------------------------------------------------------------------------------------
# Failures end the job

def _start(root: Path, log: Path, *overrides: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(_torchrun(root, *overrides), env=_env(root), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, log: Path, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None or what == "exit", f"torchrun ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _steps_done(output_dir: Path, count: int):
    return lambda: sum(r["split"] == "train" for r in read_metrics(output_dir)) >= count


@needs_proc
def test_a_killed_rank_ends_the_job_with_an_error(work, tmp_path):
    root, _ = work
    log = tmp_path / "torchrun.log"
    proc = _start(root, log, f"output_dir={tmp_path / 'run'}", "max_steps=100000", "eval_every=0", "save_every=0")
    try:
        _wait_for(_steps_done(tmp_path / "run", 2), proc, log, 120, "two steps")
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        assert proc.wait(timeout=60) != 0
        assert time.monotonic() - killed < 30
        text = log.read_text()
        assert "ChildFailedError" in text and "Signal 9 (SIGKILL) received by PID" in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@needs_proc
def test_fewer_rows_than_ranks_trains_and_a_stuck_rank_times_out(work, tmp_path):
    root, one_row = work
    log = tmp_path / "torchrun.log"
    proc = _start(root, log, f"data={one_row}", f"output_dir={tmp_path / 'run'}", "max_steps=100000",
                  "eval_every=0", "save_every=0", "dist_timeout_s=5")
    pids = {}
    try:
        # One row for two ranks: rank 1's share of every step is empty, and the steps go on.
        _wait_for(_steps_done(tmp_path / "run", 3), proc, log, 120, "three steps")
        pids = rank_pids(proc.pid)
        os.kill(pids[1], signal.SIGSTOP)  # hangs without dying: only the timeout can notice
        stopped = time.monotonic()
        _wait_for(lambda: "Timed out waiting 5000ms" in log.read_text(), proc, log, 60, "timeout")
        assert time.monotonic() - stopped < 30
    finally:
        if pids:
            os.kill(pids[1], signal.SIGCONT)  # let it receive torchrun's SIGTERM
        if proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "ChildFailedError" in log.read_text()
