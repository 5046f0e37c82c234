"""Writing kept rows as JSONL, exactly the arrays training uses, and writing files atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from instructune.data.encoded import EncodedRow
from instructune.disk import disk_full_error, is_disk_full
from instructune.errors import UserError


def _new_file_mode(path: Path) -> int:
    # mkstemp makes a private (0600) file; the result should look like any file the user writes.
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a text file that appears at `path` only once the block finishes without error.

    It writes a temporary file beside `path` and renames it over `path` at the end, so an error half
    way (a bug, a full disk, Ctrl-C) never leaves a half-written file nor destroys the one there.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as error:
        written = None
        with suppress(OSError):
            written = os.stat(tmp).st_size
            os.unlink(tmp)
        if isinstance(error, OSError) and is_disk_full(error):
            raise disk_full_error(path, written=written) from None
        if isinstance(error, OSError):
            raise UserError(f"cannot write {path}: {error.strerror or error}") from error
        raise


def row_record(row: EncodedRow) -> dict[str, object]:
    """`{"row", "input_ids", "labels"}` of a kept row, as plain ints; a mixture's row starts with its `source`."""
    source = {"source": row.source} if row.source is not None else {}
    return {**source, "row": int(row.row), "input_ids": [int(i) for i in row.input_ids],
            "labels": [int(label) for label in row.labels]}


def write_jsonl(path: str | os.PathLike, rows: Iterable[EncodedRow]) -> int:
    """Write one `{"row", "input_ids", "labels"}` object per row to `path`, atomically; return the count."""
    count = 0
    with atomic_writer(path) as file:
        for row in rows:
            file.write(json.dumps(row_record(row), separators=(",", ":")) + "\n")
            count += 1
    return count
