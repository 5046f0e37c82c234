"""Damaged inputs are found and refused with a message naming the file (models, checkpoints, GGUF files) or
made again (the GGUF conversion cache), never a traceback; a GGUF export that fills the disk says so and
leaves no file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from instructune.cli import main
from instructune.errors import UserError
from instructune.model.load import load_model
from instructune.train.config import load_config
from instructune.train.loop import train
from train_fixtures import quick_settings, write_tiny_model, write_toy_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished tiny run with checkpoints at steps 4 and 8 (each keeping its optimizer state)."""
    root = tmp_path_factory.mktemp("damaged")
    model, data = write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")
    settings = quick_settings(model, data, root / "run", max_steps=8, save_every=4, eval_every=0,
                              save_optimizer="all")
    train(load_config(overrides=settings))
    return root / "run", settings


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _cut(file: Path, keep: float = 0.5) -> None:
    file.write_bytes(file.read_bytes()[: int(file.stat().st_size * keep)])


def test_a_truncated_model_safetensors_is_refused_naming_the_file(run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(run[0] / "checkpoint-8", folder)
    (folder / "COMPLETE").unlink()  # as a plain model folder (config.json + weights), not a checkpoint
    for name in ("trainer_state.json", "training_config.yaml"):
        (folder / name).unlink()
    _cut(folder / "model.safetensors")
    with pytest.raises(UserError, match=rf"{folder / 'model.safetensors'} is damaged or cut short \(.*\); save or "
                                        "copy the model again"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"not json")  # a header that does not parse
    with pytest.raises(UserError, match=rf"{folder / 'model.safetensors'} is damaged or cut short"):
        load_model(str(folder))


def test_a_checkpoint_with_a_file_cut_short_is_refused_as_a_model_and_for_resuming(run, tmp_path, capsys):
    folder, settings = run
    copy = _copy(folder, tmp_path)
    _cut(copy / "checkpoint-8" / "model.safetensors", 0.9)
    with pytest.raises(UserError, match=rf"{copy / 'checkpoint-8' / 'model.safetensors'} has \d[\d,]* bytes where "
                                        r"[\d,]+ were written: the checkpoint is damaged"):
        load_model(str(copy / "checkpoint-8"))
    overrides = [s.replace(str(folder), str(copy)) for s in settings]
    config = tmp_path / "run.yaml"
    config.write_text("log_every: 4\n")
    assert main(["train", str(config), *overrides, "resume=true"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint-8/model.safetensors has" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["optimizer_cut", "state_garbled", "rng_cut"])
def test_a_damaged_training_state_is_refused_naming_the_file(run, tmp_path, damage):
    folder, settings = run
    copy = _copy(folder, tmp_path)
    checkpoint = copy / "checkpoint-8"
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    name = {"optimizer_cut": "optimizer.pt", "state_garbled": "trainer_state.json", "rng_cut": "rng_state.safetensors"}
    file = checkpoint / name[damage]
    if damage == "state_garbled":
        file.write_text("{" + " " * (file.stat().st_size - 1))  # the same size: only parsing can tell
    else:
        _cut(file)
        marker["sizes"][file.name] = file.stat().st_size  # as if COMPLETE agreed: what reading finds
        (checkpoint / "COMPLETE").write_text(json.dumps(marker))
    overrides = [s.replace(str(folder), str(copy)) for s in settings]
    with pytest.raises(UserError, match=rf"cannot resume from {checkpoint}: {file} is damaged"):
        train(load_config(overrides=[*overrides, "resume=true", "max_steps=12"]))


def test_a_checkpoint_without_complete_is_refused_as_a_model_and_skipped_on_resume(run, tmp_path, capsys):
    folder, settings = run
    copy = _copy(folder, tmp_path)
    (copy / "checkpoint-8" / "COMPLETE").unlink()
    with pytest.raises(UserError, match=rf"{copy / 'checkpoint-8'} is not a complete checkpoint: it has no COMPLETE"):
        load_model(str(copy / "checkpoint-8"))
    overrides = [s.replace(str(folder), str(copy)) for s in settings]
    train(load_config(overrides=[*overrides, "resume=true"]))
    out = capsys.readouterr().out
    assert f"note: {copy / 'checkpoint-8'} has no COMPLETE marker" in out
    assert f"resuming from {copy / 'checkpoint-4'} (step 4 of 8)" in out


# ---------------------------------------------------------------------------------------------------
# GGUF: a file cut short, a damaged conversion cache, a full disk while exporting

@pytest.fixture(scope="module")
def tiny_gguf(run, tmp_path_factory) -> Path:
    from instructune.model.export import export_gguf

    return export_gguf(str(run[0] / "checkpoint-8"), tmp_path_factory.mktemp("gguf") / "tiny.gguf", kind="f32")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_a_gguf_file_cut_short_is_refused_naming_it(tiny_gguf, tmp_path, monkeypatch, keep):
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: int(tiny_gguf.stat().st_size * keep)])
    with pytest.raises(UserError, match=rf"{cut} (is not a readable GGUF file|is cut short)"):
        load_model(str(cut))
    assert not list((tmp_path / "cache" / "gguf").glob("*/instructune_conversion.json"))  # nothing cached


def test_a_damaged_conversion_in_the_cache_is_made_again(tiny_gguf, tmp_path, monkeypatch):
    from instructune.model.gguf import convert_gguf

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    folder = convert_gguf(tiny_gguf)
    expected = {k: v.clone() for k, v in load_model(str(tiny_gguf)).state_dict().items()}  # not mapped from the file
    _cut(folder / "model.safetensors")
    again = load_model(str(tiny_gguf))  # found by its size, converted afresh
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())


def test_a_full_disk_while_exporting_gguf_is_one_clear_error_and_leaves_no_file(run, tmp_path, monkeypatch):
    import instructune.model.export.gguf_file as gguf_file

    def filling_write(model, tokenizer, path, kind, *, name):
        path.write_bytes(b"GGUF" + b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf_file, "_write", filling_write)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(UserError, match=rf"no space left on the device to write {out}: it needs about [\d.]+ (kB|MB)"):
        gguf_file.export_gguf(str(run[0] / "checkpoint-8"), out, kind="f16")
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary
