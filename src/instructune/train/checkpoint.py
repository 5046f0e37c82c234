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
- `COMPLETE`: written last; it holds the step and the size of every other file, so a file cut short
  afterwards (a copy that stopped, a damaged disk) is found before it is loaded (`check_checkpoint`).

Atomicity: everything is written into `checkpoint-<step>.tmp-XXXX/`, each file is fsynced, the marker
is written, and only then is the folder renamed into place with `os.replace` (atomic on POSIX) and
the parent folder fsynced. A `kill -9` at any moment therefore leaves either no `checkpoint-<step>/`
or a complete one; the previous checkpoints are untouched until the new one is in place. A write that
fails (a full disk: one `UserError` naming the checkpoint and about how much room it needs) removes its
temporary folder at once, so the space it took is free again.
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

from instructune.disk import check_complete_folder, disk_full_error, is_disk_full, tensor_bytes, torch_save
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


def incomplete_checkpoints(output_dir: str | os.PathLike, *, after: Path | None = None) -> list[Path]:
    """Folders named `checkpoint-<step>` without the `COMPLETE` marker, newer than the checkpoint `after`."""
    root = Path(output_dir)
    newest = int(_NAME.match(after.name).group(1)) if after is not None else -1
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and not is_complete(entry) and int(match.group(1)) > newest:
            found.append(entry)
    return sorted(found, key=lambda entry: int(entry.name.split("-")[1]))


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
    if save_optimizer not in SAVE_OPTIMIZER:
        raise ValueError(f"save_optimizer must be one of {SAVE_OPTIMIZER}, got {save_optimizer!r}")
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=output_dir))
    try:
        _write_checkpoint(tmp, step, model=model, tokenizer=tokenizer, config_yaml=config_yaml,
                          optimizer_state=(optimizer_state if optimizer_state is not None else optimizer.state_dict())
                          if save_optimizer != "none" else None, state=state, model_state=model_state)
        if final.exists():  # an incomplete folder of that name (never made by this code, but be safe)
            _remove(final)
        os.replace(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)  # at once: on a full disk, its room is what the user needs back
        if isinstance(error, Exception) and is_disk_full(error):
            previous = latest_checkpoint(output_dir)
            needed = checkpoint_bytes(model, model_state, optimizer_state, optimizer, save_optimizer, previous)
            kept = f"{previous.name} is intact; " if previous is not None else ""
            raise disk_full_error(final, needed, hint=f"{kept}free some space (or lower keep_last), then continue "
                                  "with resume=true") from None
        raise
    _fsync(Path(output_dir))
    prune_checkpoints(output_dir, keep_last)
    if save_optimizer == "last":
        drop_older_optimizer_states(output_dir, step)
    return final


def _write_checkpoint(tmp: Path, step: int, *, model, tokenizer, config_yaml: str, optimizer_state: dict | None,
                      state: dict[str, Any], model_state: dict[str, torch.Tensor] | None) -> None:
    """Every file of a checkpoint into `tmp`, flushed to disk, `COMPLETE` (with the files' sizes) last."""
    with quiet_saving():
        model.save_pretrained(tmp, state_dict=model_state)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (tmp / "generation_config.json").exists():
        generation_config.save_pretrained(tmp)  # a PEFT adapter folder: keep the base's stop tokens
    tokenizer.save_pretrained(tmp)
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    if optimizer_state is not None:
        torch_save(optimizer_state, tmp / OPTIMIZER_FILE)
    save_file(_rng_tensors(), tmp / RNG_FILE)
    python_rng = random.getstate()
    full_state = {**state, "step": step, "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]]}
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
    _sync_tree(tmp)
    sizes = {str(path.relative_to(tmp)): path.stat().st_size for path in sorted(tmp.rglob("*")) if path.is_file()}
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "sizes": sizes}, indent=1) + "\n", encoding="utf-8")
    _fsync(tmp / COMPLETE_MARKER)


def checkpoint_bytes(model, model_state: dict | None, optimizer_state: dict | None,
                     optimizer: torch.optim.Optimizer | None, save_optimizer: str, previous: Path | None = None) -> int:
    """About how many bytes a checkpoint takes: the weights it saves (a LoRA adapter: the trained ones only),
    the optimizer state when it keeps one, and the rest (tokenizer, configs): as much as in the `previous`
    checkpoint, or 2 MB without one."""
    if model_state is not None:
        weights = tensor_bytes(model_state)
    elif hasattr(model, "peft_config"):
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    else:
        weights = tensor_bytes(dict(model.state_dict()))
    moments = 0
    if save_optimizer != "none":
        moments = tensor_bytes(optimizer_state if optimizer_state is not None else optimizer.state_dict()["state"])
    rest = 2_000_000
    if previous is not None:
        heavy = (".safetensors", ".pt", ".bin")
        rest = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file() and not p.name.endswith(heavy))
    return weights + moments + rest


def check_checkpoint(path: str | os.PathLike) -> None:
    """A `UserError` naming the file when a checkpoint lacks `COMPLETE`, or a file of it is missing or not
    the size `COMPLETE` recorded (see `disk.check_complete_folder`)."""
    check_complete_folder(path, COMPLETE_MARKER, optional=(OPTIMIZER_FILE,))


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
    """The JSON trainer state of a checkpoint (step, counters, elapsed time); a `UserError` when damaged."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot resume from {path}: {file} is damaged or missing ({error}); use an older "
                        "checkpoint, or delete this one to resume from the one before it") from None


def read_optimizer_state(path: str | os.PathLike, map_location) -> dict[str, Any]:
    """A checkpoint's optimizer state with `weights_only=True` (nothing unpickled); a `UserError` naming the
    file when it is missing or damaged."""
    file = optimizer_state_file(path)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot resume from {path}: {file} is damaged ({reason}); use an older checkpoint, "
                        "or delete this one to resume from the one before it") from None


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state; `weights_only=True` refuses anything but tensors and plain data."""
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    optimizer.load_state_dict(read_optimizer_state(path, device))


def restore_rng(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Put the torch and Python RNGs back where they were when the checkpoint was written."""
    try:
        tensors = load_file(str(Path(path) / RNG_FILE))
    except Exception as error:  # SafetensorError (a cut or damaged file) is a plain Exception
        raise UserError(f"cannot resume from {path}: {Path(path) / RNG_FILE} is damaged or missing "
                        f"({str(error).strip() or type(error).__name__}); use an older checkpoint") from None
    torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
