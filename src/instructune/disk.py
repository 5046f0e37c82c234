"""A full disk, told clearly: which write failed, about how much room it needed, how much there is; and
a folder whose files were cut short since they were written, found before anything reads them.

Every file instructune writes goes to a temporary name first and is renamed into place once whole, so a
full disk never leaves a half-written file under a final name; what this module adds is the message.
The libraries that do the writing report a full disk in their own ways (`OSError` with `ENOSPC` from
Python's files, `SafetensorError` "os error 28" from safetensors, a bare `RuntimeError` from
`torch.save`, which `RecordingFile` sees through), and `is_disk_full` knows them all.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from instructune.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
"""No space left on the device, and a disk quota exceeded: the same remedy."""
_RUST_IO = re.compile(r"os error (\d+)")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk or the quota is full."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        recorded = getattr(error, "disk_error", None)
        if isinstance(recorded, OSError) and recorded.errno in DISK_FULL_ERRNOS:
            return True
        match = _RUST_IO.search(str(error)) if type(error).__name__ == "SafetensorError" else None
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def human_size(size: float) -> str:
    """`1.6 GB`, `340 MB`, `12 kB`, `512 bytes` (decimal units, as `df -H` counts)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free for an ordinary user on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_message(path: str | os.PathLike, needed: int | None = None, *, written: int | None = None,
                      hint: str = "") -> str:
    """`no space left on the device to write PATH: it needs about 1.6 GB, 210 MB are free there; HINT`."""
    parts = [f"no space left on the device to write {path}"]
    if needed:
        parts.append(f"it needs about {human_size(needed)}")
    elif written:
        parts.append(f"{human_size(written)} were written when the disk filled, and it needs more")
    free = free_space(path)
    if free is not None:
        parts.append(f"{human_size(free)} {'is' if free < 2 else 'are'} free there")
    message = ": ".join(parts[:2]) + "".join(f", {part}" for part in parts[2:])
    return message + (f"; {hint}" if hint else "; free some space or write elsewhere")


def disk_full_error(path: str | os.PathLike, needed: int | None = None, *, written: int | None = None,
                    hint: str = "") -> UserError:
    """The `UserError` of a write to `path` that found the disk full (see `disk_full_message`)."""
    return UserError(disk_full_message(path, needed, written=written, hint=hint))


class RecordingFile:
    """A binary file whose write errors are kept in `disk_error`: `torch.save` turns them into a bare
    `RuntimeError` ("unexpected pos ..."), and this keeps the cause it drops."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.disk_error: OSError | None = None

    def write(self, data) -> int:
        """Write `data`, recording an `OSError` before it goes on."""
        try:
            return self.file.write(data)
        except OSError as error:
            self.disk_error = error
            raise

    def flush(self) -> None:
        """Flush the underlying file."""
        try:
            self.file.flush()
        except OSError as error:
            self.disk_error = error
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, flushed to disk, with a full disk raised as the `OSError` it is."""
    import torch

    with open(path, "wb") as raw:
        file = RecordingFile(raw)
        try:
            torch.save(obj, file)
            file.flush()
            os.fsync(raw.fileno())
        except RuntimeError as error:
            if file.disk_error is not None:
                raise file.disk_error from error
            raise


def tensor_bytes(obj) -> int:
    """How many bytes the tensors in `obj` (nested dicts, lists, tuples) hold: about their size on disk."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def check_complete_folder(path: str | os.PathLike, marker: str = "COMPLETE", *, optional: tuple[str, ...] = ()) -> None:
    """A `UserError` naming the file when the folder `path` (a training checkpoint) has no `marker`, or when a
    file the marker lists (`{"sizes": {name: bytes}}`) is missing or another size: cut short or changed since.
    `optional` files may be missing (removed on purpose); markers from before sizes were kept pass."""
    folder = Path(path)
    if not (folder / marker).is_file():
        raise UserError(f"{folder} is not a complete checkpoint: it has no {marker} marker, so its writing was "
                        "interrupted or it was copied in part; use an older checkpoint")
    try:
        recorded = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        recorded = None
    sizes = recorded.get("sizes") if isinstance(recorded, dict) else None
    for name, size in (sizes or {}).items():
        file = folder / name
        actual = file.stat().st_size if file.is_file() else None
        if actual is None and name in optional:
            continue
        if actual != size:
            state = "is missing" if actual is None else f"has {actual:,} bytes where {size:,} were written"
            raise UserError(f"{file} {state}: the checkpoint is damaged (cut short or changed since it was saved); "
                            "use an older checkpoint, or delete this one to resume from the one before it")
