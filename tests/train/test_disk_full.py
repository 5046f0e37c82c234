"""A full disk while training: one clear error naming the checkpoint (or file) and about how much room it
needs; the previous checkpoint intact and resumable; nothing half-written under a final name. The failure
is injected at each write call of a checkpoint, then met for real on a size-limited tmpfs (as root)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import instructune.disk as disk
import instructune.train.checkpoint as checkpoint
from instructune.disk import is_disk_full, torch_save
from instructune.errors import UserError
from instructune.train.checkpoint import check_checkpoint, latest_checkpoint, list_checkpoints
from instructune.train.config import load_config
from instructune.train.loop import train
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data


class SafetensorError(Exception):
    """What safetensors raises (its class has this name; `is_disk_full` reads the OS error in its message)."""


def _full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("disk")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def _in_second_checkpoint(path) -> bool:
    return "checkpoint-8.tmp-" in str(path)


def _weights(monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save(self, folder, *args, **kwargs):
        if _in_second_checkpoint(folder):
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)  # a file begun, as a real write would
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


def _tokenizer(monkeypatch):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def save(self, folder, *args, **kwargs):
        if _in_second_checkpoint(folder):
            raise _full()
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)


def _optimizer(monkeypatch):
    real = disk.RecordingFile.write

    def write(self, data):
        if _in_second_checkpoint(self.file.name) and self.file.tell() > 1000:
            self.disk_error = _full()  # torch.save hides this behind "unexpected pos": torch_save finds it again
            raise self.disk_error
        return real(self, data)

    monkeypatch.setattr(disk.RecordingFile, "write", write)


def _rng(monkeypatch):
    real = checkpoint.save_file

    def save(tensors, path, *args, **kwargs):
        if _in_second_checkpoint(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save)


def _text_file(name: str):
    def inject(monkeypatch):
        real = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == name and _in_second_checkpoint(self):
                raise _full()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    return inject


WRITES = {"weights": _weights, "tokenizer": _tokenizer, "optimizer": _optimizer, "rng": _rng,
          "config": _text_file("training_config.yaml"), "state": _text_file("trainer_state.json"),
          "complete": _text_file("COMPLETE")}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_full_disk_at_each_checkpoint_write_is_one_clear_error_and_the_previous_checkpoint_stays(
        tiny, tmp_path, monkeypatch, write):
    model, data = tiny
    run = tmp_path / "run"
    settings = quick_settings(model, data, run, max_steps=12, save_every=4, eval_every=0)
    WRITES[write](monkeypatch)
    with pytest.raises(UserError) as failure:
        train(load_config(overrides=settings))
    message = str(failure.value)
    assert message.startswith(f"no space left on the device to write {run / 'checkpoint-8'}: it needs about ")
    assert "checkpoint-4 is intact" in message and "resume=true" in message and " free there" in message
    assert [step for step, _ in list_checkpoints(run)] == [4]
    check_checkpoint(run / "checkpoint-4")  # every file the size it was written at
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "config.yaml", "metrics.jsonl"]
    if write == "optimizer":  # once the disk has room again, the run resumes and ends as if nothing happened
        monkeypatch.undo()
        train(load_config(overrides=[*settings, "resume=true"]))
        train(load_config(overrides=quick_settings(model, data, tmp_path / "reference", max_steps=12, save_every=4,
                                                   eval_every=0)))
        assert train_records(run) == train_records(tmp_path / "reference")


def test_a_full_disk_while_logging_metrics_leaves_whole_lines(tiny, tmp_path, monkeypatch):
    import instructune.train.metrics as metrics

    model, data = tiny
    run = tmp_path / "run"
    real = metrics.MetricsLogger.log
    calls = []

    class FillingFile:
        """The metrics file on a disk that fills half way through the 6th line."""

        def __init__(self, file):
            self.file = file

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise _full()

        def __getattr__(self, name):
            return getattr(self.file, name)

    def log(self, record):
        calls.append(record)
        if len(calls) == 6:
            self._file = FillingFile(self._file)
        return real(self, record)

    monkeypatch.setattr(metrics.MetricsLogger, "log", log)
    with pytest.raises(UserError, match=rf"no space left on the device to write {run / 'metrics.jsonl'}: it needs "
                                        r"about \d+ bytes.*the newest checkpoint is intact"):
        train(load_config(overrides=quick_settings(model, data, run, max_steps=12, save_every=4, eval_every=0)))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(line.endswith("}") for line in lines)  # nothing half-written is left
    assert latest_checkpoint(run) == run / "checkpoint-4"


def test_torch_save_reports_a_full_disk_as_the_os_error_it_is(tmp_path, monkeypatch):
    def fail(self, data):
        self.disk_error = _full()
        raise self.disk_error

    monkeypatch.setattr(disk.RecordingFile, "write", fail)
    with pytest.raises(OSError) as failure:
        torch_save({"x": torch.zeros(10)}, tmp_path / "state.pt")
    assert failure.value.errno == errno.ENOSPC and is_disk_full(failure.value)
    assert is_disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(SafetensorError("invalid JSON in header")) and not is_disk_full(RuntimeError("x"))


# ---------------------------------------------------------------------------------------------------
# The real thing: a tmpfs with room for one checkpoint and a half

def _mount_tmpfs(folder: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    def mount(size: int) -> Path:
        folder = tmp_path / "small"
        if not _mount_tmpfs(folder, size):
            pytest.skip("mounting a size-limited tmpfs needs root (the fault-injection tests above cover the writes)")
        mounted.append(folder)
        return folder

    mounted: list[Path] = []
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_during_a_checkpoint(tiny, tmp_path, small_disk):
    model, data = tiny
    reference = tmp_path / "reference"
    settings = dict(max_steps=8, save_every=4, eval_every=0, keep_last=10)
    train(load_config(overrides=quick_settings(model, data, reference, **settings)))
    pages = [-(-p.stat().st_size // 4096) * 4096 for p in (reference / "checkpoint-8").rglob("*") if p.is_file()]
    run = small_disk(int(sum(pages) * 1.5) + 64 * 1024) / "run"  # checkpoint-4 fits (tmpfs counts pages), -8 not
    with pytest.raises(UserError) as failure:
        train(load_config(overrides=quick_settings(model, data, run, **settings)))
    message = str(failure.value)
    assert message.startswith(f"no space left on the device to write {run / 'checkpoint-8'}: it needs about ")
    assert "checkpoint-4 is intact" in message
    assert [step for step, _ in list_checkpoints(run)] == [4]
    check_checkpoint(run / "checkpoint-4")
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]  # its room was given back at once
