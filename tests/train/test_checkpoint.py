"""Checkpoints: complete folders only, pruning, what they contain, and surviving `kill -9` mid-write."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instructune.train.checkpoint import (
    COMPLETE_MARKER,
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    prune_checkpoints,
    remove_leftovers,
    save_checkpoint,
)
from instructune.train.config import load_config
from instructune.train.loop import train
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def _loads_with_transformers(checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.isfinite().all()


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if complete:
        (folder / COMPLETE_MARKER).write_text(str(step))
    return folder


def test_only_complete_checkpoints_count_and_leftovers_are_removed(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 12, complete=False)  # never produced by save_checkpoint, but be safe
    (tmp_path / "checkpoint-14.tmp-abc").mkdir()
    (tmp_path / "checkpoint-2.deleting-xyz").mkdir()
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10]  # numeric, not string, order
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    remove_leftovers(tmp_path)
    assert not (tmp_path / "checkpoint-14.tmp-abc").exists()
    assert not (tmp_path / "checkpoint-2.deleting-xyz").exists()
    assert latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_checkpoint_contents_load_as_is_and_without_unpickling(tiny, tmp_path):
    model, data = tiny
    result = train(load_config(overrides=quick_settings(model, data, tmp_path / "run", keep_last=2)))
    steps = [step for step, _ in list_checkpoints(tmp_path / "run")]
    assert steps == [8, 12]  # saved every 4 steps, the newest 2 kept
    checkpoint = result.checkpoint
    assert checkpoint == tmp_path / "run" / "checkpoint-12"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "training_config.yaml", "trainer_state.json", "optimizer.pt", "rng_state.safetensors",
            COMPLETE_MARKER} <= names
    assert not any(name.endswith((".bin", ".pkl")) for name in names)
    _loads_with_transformers(checkpoint)
    # The training state is plain data: the optimizer state loads with weights_only=True.
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert set(state) == {"state", "param_groups"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 12
    assert load_config(checkpoint / "training_config.yaml").max_steps == 12
    # Checkpoints stop generation at the end of a turn, not only at EOS.
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2


def test_save_at_a_step_that_exists_is_a_no_op(tiny, tmp_path):
    model, data = tiny
    train(load_config(overrides=quick_settings(model, data, tmp_path / "run", max_steps=4)))
    checkpoint = tmp_path / "run" / "checkpoint-4"
    before = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert save_checkpoint(tmp_path / "run", 4, model=None, tokenizer=None, config_yaml="", optimizer=None,
                           state={}, keep_last=1) == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == before


def test_optimizer_state_round_trip(tiny, tmp_path):
    from instructune.model.load import load_model
    from instructune.train.optim import build_optimizer

    model = load_model(str(tiny[0]))
    optimizer = build_optimizer(model, 1e-3, 0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    fresh = build_optimizer(model, 1e-3, 0.1)
    load_optimizer_state(tmp_path, fresh)
    saved, loaded = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k][name], loaded[k][name]) for k in saved for name in saved[k])


# ---------------------------------------------------------------------------------------------------
# kill -9

_TRAINER = """
import sys, time
import torch
torch.set_num_threads(1)
import instructune.train.checkpoint as checkpoint
from instructune.train.config import load_config
from instructune.train.loop import train

slow_from = int(sys.argv[1])
original = checkpoint._sync_tree

def slow_sync(folder):
    # Hold the write open long enough for the test to kill the process in the middle of it.
    if slow_from and int(folder.name.split("-")[1].split(".")[0]) >= slow_from:
        (folder.parent / "WRITING").write_text(folder.name)
        time.sleep(60)
    original(folder)

checkpoint._sync_tree = slow_sync
train(load_config(overrides=sys.argv[2:]))
"""


def _start_trainer(settings: list[str], slow_from: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", _TRAINER, str(slow_from), *settings], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def test_kill_during_checkpoint_write_keeps_the_previous_one_and_resume_matches(tiny, tmp_path):
    model, data = tiny
    run = tmp_path / "killed"
    settings = quick_settings(model, data, run, save_every=4, max_steps=12)
    process = _start_trainer(settings, slow_from=8)
    _wait_for(run / "WRITING", process)  # checkpoint-8 is half-written right now
    assert any(p.name.startswith("checkpoint-8.tmp-") for p in run.iterdir())
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert latest_checkpoint(run) == run / "checkpoint-4"
    assert not (run / "checkpoint-8").exists()
    _loads_with_transformers(run / "checkpoint-4")

    # Resuming continues from step 4 and reproduces an uninterrupted run bit for bit.
    train(load_config(overrides=[*settings, "resume=true"]))
    assert not any(".tmp-" in p.name for p in run.iterdir())
    train(load_config(overrides=quick_settings(model, data, tmp_path / "reference", save_every=4, max_steps=12)))
    assert train_records(run) == train_records(tmp_path / "reference")
    assert [r["step"] for r in train_records(run) if r["split"] == "train"] == list(range(1, 13))


def test_kill_at_random_moments_always_leaves_a_loadable_checkpoint(tiny, tmp_path):
    model, data = tiny
    rng = random.Random(0)
    run = tmp_path / "random"
    # Saving every step keeps a write in flight most of the time the trainer runs (6 kills out of 6 landed
    # inside a write when this was measured), so the kills test the atomic rename, not just the idle loop.
    settings = quick_settings(model, data, run, save_every=1, keep_last=2, max_steps=400, eval_every=0)
    for attempt in range(2):
        process = _start_trainer([*settings, "resume=true"] if attempt else settings)
        steps_before = [step for step, _ in list_checkpoints(run)]
        deadline = time.monotonic() + 120
        while [step for step, _ in list_checkpoints(run)] == steps_before:  # wait until it is saving
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = latest_checkpoint(run)
        assert latest is not None
        _loads_with_transformers(latest)
        assert len(list_checkpoints(run)) <= 3  # keep_last, plus the newest when the kill came before pruning


# ---------------------------------------------------------------------------------------------------
# save_optimizer: the optimizer state (twice the fp32 weights) only where a resume needs it

def _with_optimizer(run: Path) -> list[int]:
    return [step for step, path in list_checkpoints(run) if (path / "optimizer.pt").is_file()]


def test_only_the_newest_checkpoint_keeps_the_optimizer_state_and_resume_is_still_exact(tiny, tmp_path,
                                                                                       monkeypatch):
    import instructune.train.loop as loop
    from instructune.errors import UserError

    model, data = tiny
    run = tmp_path / "run"
    settings = quick_settings(model, data, run, save_every=4, max_steps=12)
    real_save = loop.save_checkpoint

    def crash_at_12(output_dir, step, **kwargs):
        if step == 12:
            raise KeyboardInterrupt("killed while saving step 12")
        return real_save(output_dir, step, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", crash_at_12)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=settings))
    monkeypatch.undo()
    assert _with_optimizer(run) == [8]  # checkpoint-4 gave its state up once checkpoint-8 was complete
    _loads_with_transformers(run / "checkpoint-4")  # a model-only checkpoint is still a model

    train(load_config(overrides=[*settings, "resume=true"]))  # from the newest, checkpoint-8
    train(load_config(overrides=quick_settings(model, data, tmp_path / "reference", save_every=4, max_steps=12)))
    assert train_records(run) == train_records(tmp_path / "reference")
    assert _with_optimizer(run) == [12] and [s for s, _ in list_checkpoints(run)] == [4, 8, 12]

    # A newest checkpoint without optimizer state (here: checkpoint-12 deleted by hand) is refused, clearly.
    shutil.rmtree(run / "checkpoint-12")
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"cannot resume from .*checkpoint-8: it holds no optimizer state "
                                        r"\(optimizer.pt\).*save_optimizer: last keeps the state in the newest"):
        train(load_config(overrides=[*settings, "resume=true"]))
    assert (run / "metrics.jsonl").read_text() == metrics  # refused before anything was written


def test_save_optimizer_all_keeps_every_state_and_none_keeps_none(tiny, tmp_path):
    from instructune.errors import UserError

    model, data = tiny
    for choice, expected in (("all", [2, 4]), ("none", [])):
        run = tmp_path / choice
        train(load_config(overrides=quick_settings(model, data, run, save_every=2, max_steps=4, eval_every=0,
                                                   save_optimizer=choice)))
        assert [s for s, _ in list_checkpoints(run)] == [2, 4] and _with_optimizer(run) == expected
    _loads_with_transformers(tmp_path / "none" / "checkpoint-4")
    with pytest.raises(UserError, match="save_optimizer: none"):
        train(load_config(overrides=quick_settings(model, data, tmp_path / "none", save_every=2, max_steps=6,
                                                   eval_every=0, save_optimizer="none", resume=True)))
    with pytest.raises(UserError, match="'save_optimizer': expected one of last, all, none, got 'some'"):
        load_config(overrides=["save_optimizer=some"])
