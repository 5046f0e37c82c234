"""SIGTERM / SIGINT stop a run after its current step with a checkpoint (exit status 75, a resume hint), and
`resume=true` then continues it exactly; a second signal stops at once and leaves every checkpoint whole;
under torchrun the ranks stop together at the same step, whichever rank got the signal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from instructune.train.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state
from instructune.train.config import load_config
from instructune.train.loop import train
from instructune.train.metrics import read_metrics
from instructune.train.stopping import STOPPED_EXIT_STATUS, resume_command
from train_fixtures import quick_settings, rank_pids, train_records, write_tiny_model, write_toy_data

needs_posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# The CLI with one hook: `HOLD_AT` (a step) makes the checkpoint write of that step announce itself in
# the file `WRITING` and wait there, so that a test can signal it in the middle of a write.
_CLI = """
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import instructune.train.checkpoint as checkpoint

hold = int(os.environ.get("HOLD_AT", "0"))
original = checkpoint._sync_tree

def held_sync(folder):
    if hold and folder.name.startswith(f"checkpoint-{hold}.tmp-"):
        (folder.parent / "WRITING").write_text(folder.name)
        time.sleep(120)  # the test signals this process while it waits here
    original(folder)

checkpoint._sync_tree = held_sync
from instructune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stop")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def _settings(model: Path, data: Path, output_dir: Path) -> list[str]:
    # eval_every: an evaluation falls due on many steps, so some stops skip one that the resumed run must do.
    return quick_settings(model, data, output_dir, max_steps=200, save_every=40, eval_every=3, log_every=100)


def _start(settings: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    config = tmp_path / "run.yaml"
    config.write_text("log_every: 100\n")  # the settings come as key=value
    return subprocess.Popen([sys.executable, "-c", _CLI, "train", str(config), *settings],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_until(condition, process: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the trainer ended early: {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the trainer did not get there in time"
        time.sleep(0.005)


def _train_steps(output_dir: Path) -> int:
    return sum(r.get("split") == "train" for r in read_metrics(output_dir))


@needs_posix_signals
def test_a_signal_at_random_moments_stops_after_the_step_and_resume_is_exact(tiny, tmp_path):
    model, data = tiny
    train(load_config(overrides=_settings(model, data, tmp_path / "reference")))
    reference = train_records(tmp_path / "reference")
    rng = random.Random(28)
    for trial, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGTERM)):
        run = tmp_path / f"trial{trial}"
        settings = _settings(model, data, run)
        process = _start(settings, tmp_path)
        target = rng.randint(1, 170)
        _wait_until(lambda run=run, target=target: _train_steps(run) >= target, process)
        time.sleep(rng.uniform(0, 0.01))  # anywhere within a step, or between two
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == STOPPED_EXIT_STATUS, stderr[-3000:]
        stopped_at = _train_steps(run)
        checkpoint = latest_checkpoint(run)
        assert checkpoint == run / f"checkpoint-{stopped_at}", (stopped_at, list_checkpoints(run))
        assert load_trainer_state(checkpoint)["step"] == stopped_at
        assert f"{sig.name} received: finishing this step" in stderr
        assert f"stopped by {sig.name} after step {stopped_at} of 200; checkpoint saved in {checkpoint}" in stderr
        assert f"to continue: instructune train {tmp_path / 'run.yaml'} " in stderr and "resume=true" in stderr
        assert "Traceback" not in stderr
        assert not [p for p in run.iterdir() if ".tmp-" in p.name]

        train(load_config(overrides=[*settings, "resume=true"]))
        assert train_records(run) == reference, f"trial {trial}: stopped after step {stopped_at}"


@needs_posix_signals
def test_a_second_signal_stops_at_once_and_leaves_the_checkpoints_whole(tiny, tmp_path):
    model, data = tiny
    run = tmp_path / "run"
    settings = _settings(model, data, run)
    process = _start(settings, tmp_path, HOLD_AT="80")  # checkpoint-80's write waits half-way
    _wait_until(lambda: (run / "WRITING").exists(), process)
    process.send_signal(signal.SIGTERM)  # noted: the step is over, the checkpoint under way goes on
    _wait_until(lambda: _train_steps(run) >= 80, process)
    process.send_signal(signal.SIGTERM)  # a second one: stop now, in the middle of the write
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped at once by a second SIGTERM" in stderr and "Traceback" not in stderr
    assert [step for step, _ in list_checkpoints(run)] == [40]  # checkpoint-80 was never renamed into place
    assert not (run / "checkpoint-80").exists()
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # and its temporary folder is gone

    train(load_config(overrides=[*settings, "resume=true"]))
    train(load_config(overrides=_settings(model, data, tmp_path / "reference")))
    assert train_records(run) == train_records(tmp_path / "reference")


def test_the_resume_hint_repeats_the_command_with_resume_true():
    argv = ["/usr/bin/instructune", "train", "my run.yaml", "lr=1e-3", "overwrite=true"]
    assert resume_command(argv) == "instructune train 'my run.yaml' lr=1e-3 resume=true"
    assert "resume=true" in resume_command(["python", "script.py"])


# ---------------------------------------------------------------------------------------------------
# torchrun: the ranks agree through the step's all-reduce

@pytest.mark.skipif(sys.platform != "linux" or not (dist.is_available() and dist.is_gloo_available()),
                    reason="torchrun with gloo; finds the ranks through /proc")
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny, tmp_path):
    model, data = tiny
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model}\ndata: {data}\nbatch_size: 4\nlr: 0.01\nmax_steps: 100000\n"
                      f"eval_every: 0\nsave_every: 0\nlog_every: 1000\ndist_timeout_s: 60\noutput_dir: {run}\n")
    log = tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "instructune", "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(tmp_path / "cache")}
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: _train_steps(run) >= 3, proc)
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)  # only rank 1 hears it: rank 0 learns it in the all-reduce
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    steps = _train_steps(run)
    checkpoint = latest_checkpoint(run)
    assert checkpoint == run / f"checkpoint-{steps}", text[-3000:]
    assert load_trainer_state(checkpoint)["world_size"] == 2
    assert f"stopped by a signal on another rank after step {steps} of 100000" in text  # rank 0's words
    assert text.count(f"exitcode  : {STOPPED_EXIT_STATUS}") == 2  # both ranks stopped, neither failed
    assert json.loads((checkpoint / "COMPLETE").read_text())["step"] == steps
