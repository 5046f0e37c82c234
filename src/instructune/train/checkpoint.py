"""Checkpoints: written atomically, pruned to the newest few, found and loaded again for resuming.

A checkpoint is `OUTPUT_DIR/checkpoint-<step>/`: what `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as is (safetensors weights or a LoRA adapter, config, generation
config, tokenizer with the chat template the run trained with), plus the training state:

- `training_config.yaml`: the resolved configuration;
- `trainer_state.json`: step, counters, elapsed time, Python RNG state;
- `rng_state.safetensors`: the torch RNG states (CPU and CUDA);
- `optimizer.pt`: the optimizer state, loaded back with `torch.load(weights_only=True)`, so nothing
  is ever unpickled. It is twice the size of fp32 weights (AdamW's two moments), so `save_optimizer`
  chooses where it stays: `last` (the default) keeps it in the newest checkpoint only, removing it
  from the older ones once a newer checkpoint is complete; `all` keeps it everywhere; `none` never
  writes it. A checkpoint without it still loads as a model, but a run cannot resume from it;
- `COMPLETE`: written last.

Atomicity: everything is written into `checkpoint-<step>.tmp-XXXX/`, each file is fsynced, the marker
is written, and only then is the folder renamed into place with `os.replace` (atomic on POSIX) and
the parent folder fsynced. A `kill -9` at any moment therefore leaves either no `checkpoint-<step>/`
or a complete one; the previous checkpoints are untouched until the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from instructune.errors import UserError

COMPLETE_MARKER = "COMPLETE"
CONFIG_FILE = "training_config.yaml"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SAVE_OPTIMIZER = ("last", "all", "none")
"""Which checkpoints keep `optimizer.pt`: the newest only, every one, or none."""

_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^checkpoint-\d+\.(tmp|deleting)-")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint at `step`."""
    return Path(output_dir) / f"checkpoint-{step}"


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` is a checkpoint folder whose write finished."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Delete half-written or half-deleted checkpoint folders left by a killed run."""
    root = Path(output_dir)
    if root.is_dir():
        for entry in root.iterdir():
            if _LEFTOVER.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that no moment leaves it looking complete but partial."""
    doomed = Path(tempfile.mkdtemp(prefix=f"{path.name}.deleting-", dir=path.parent))
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        _remove(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_tree(root: Path) -> None:
    """Flush every file under `root` and the folders themselves to disk, with ordinary permissions.

    `mkdtemp` (and some writers) create private files; a checkpoint is an ordinary folder.
    """
    mask = _umask()
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)
            _fsync(Path(folder) / name)
        os.chmod(folder, 0o777 & ~mask)
        _fsync(Path(folder))


@contextmanager
def quiet_saving():
    """Keep transformers' "Writing model shards" bar out of the training output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return tensors


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model, tokenizer, config_yaml: str,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last: int,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None, save_optimizer: str = "last") -> Path:
    """Write the checkpoint of `step` atomically, then prune to `keep_last`; returns its folder.

    `save_optimizer` (see `SAVE_OPTIMIZER`) says whether this checkpoint gets `optimizer.pt` and
    whether the older ones lose theirs once this one is complete.

    `model` is a transformers model or a PEFT model (then the adapter is saved, which
    `AutoModelForCausalLM` loads on top of its base); `state` is JSON-serialisable trainer state.
    `model_state` and `optimizer_state` replace the model's and the optimizer's own state dicts (FSDP
    gathers the full ones from the shards; the shards themselves are not what a checkpoint holds).
    """
    final = checkpoint_dir(output_dir, step)
    if is_complete(final):  # the end of a run that also saved on its last step
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=output_dir))
    with quiet_saving():
        model.save_pretrained(tmp, state_dict=model_state)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (tmp / "generation_config.json").exists():
        generation_config.save_pretrained(tmp)  # a PEFT adapter folder: keep the base's stop tokens
    tokenizer.save_pretrained(tmp)
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    if save_optimizer not in SAVE_OPTIMIZER:
        raise ValueError(f"save_optimizer must be one of {SAVE_OPTIMIZER}, got {save_optimizer!r}")
    if save_optimizer != "none":
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    save_file(_rng_tensors(), tmp / RNG_FILE)
    python_rng = random.getstate()
    full_state = {**state, "step": step, "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]]}
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
    _sync_tree(tmp)
    (tmp / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync(tmp / COMPLETE_MARKER)
    if final.exists():  # an incomplete folder of that name (never made by this code, but be safe)
        _remove(final)
    os.replace(tmp, final)
    _fsync(Path(output_dir))
    prune_checkpoints(output_dir, keep_last)
    if save_optimizer == "last":
        drop_older_optimizer_states(output_dir, step)
    return final


def drop_older_optimizer_states(output_dir: str | os.PathLike, step: int) -> None:
    """Remove `optimizer.pt` from every complete checkpoint older than `step` (they stay loadable models).

    Called once the checkpoint of `step` is complete, so a kill at any moment still leaves a newest
    checkpoint with its optimizer state; a kill in the middle leaves an older one with its file, which
    the next save removes.
    """
    for older_step, path in list_checkpoints(output_dir):
        if older_step < step:
            (path / OPTIMIZER_FILE).unlink(missing_ok=True)


def optimizer_state_file(path: str | os.PathLike) -> Path:
    """The checkpoint's `optimizer.pt`; a `UserError` when it has none (it cannot be resumed from)."""
    file = Path(path) / OPTIMIZER_FILE
    if not file.is_file():
        raise UserError(
            f"cannot resume from {path}: it holds no optimizer state ({OPTIMIZER_FILE}); it was written with "
            "save_optimizer: none, or it is an older checkpoint (save_optimizer: last keeps the state in the "
            f"newest only). It still loads as a model: model={path} starts a new run from its weights")
    return file


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON trainer state of a checkpoint (step, counters, elapsed time)."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state; `weights_only=True` refuses anything but tensors and plain data."""
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    saved = torch.load(optimizer_state_file(path), map_location=device, weights_only=True)
    optimizer.load_state_dict(saved)


def restore_rng(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Put the torch and Python RNGs back where they were when the checkpoint was written."""
    tensors = load_file(str(Path(path) / RNG_FILE))
    torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
