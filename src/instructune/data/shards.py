"""Encoded rows on disk, in shards, read back memory-mapped.

A prepared cache entry is a folder:

    shards/00000/   the rows of the first chunk of conversations (see below)
    shards/00001/
    ...
    manifest.json   written last: the shards in order and the report of the encoding

A shard holds the encoded rows of one chunk of consecutive conversations as numpy `.npy` files:
`input_ids` (int32, every row's tokens one after another), `offsets` (int64, where each row starts,
plus the end), `marks` (uint8 per token: the role code in the low bits, `TRAINED` set when the token
is scored, its label then being the token itself), `rows` (int64 source row index), `turns` (int32,
-1 for none) and `truncated` (bool); `report.json` is the chunk's part of the report, and `meta.json`
the checksums of the other files. A shard is written in a temporary folder and renamed into place, so a
folder with a shard's name is whole unless the disk itself damaged it, which the checksums catch:
a preparation that was interrupted resumes from the shards that check out and redoes the rest. Reading
a finished entry back checks every file's checksum too (about 3 GB/s), so a shard damaged since it was
written is found and encoded again, never read as rows. A full disk stops the preparation with one
error (`cache_full_error`) and leaves the finished shards in place for the next run.

`ShardedRows` reads the rows of a finished entry by index without loading them: each file is mapped,
and a row becomes an `EncodedRow` only when it is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from instructune.data.encoded import EncodedRow, PreparationReport, length_array
from instructune.disk import disk_full_error, human_size
from instructune.errors import UserError

IGNORE_INDEX = -100
TRAINED = 0x80
"""The bit of a token's mark that says its label is the token itself (else it is not scored)."""
ARRAYS = ("input_ids", "offsets", "marks", "rows", "turns", "truncated")
SHARD_FORMAT = 1


# -- writing -------------------------------------------------------------------------------------------

def shard_folder(entry: Path, number: int) -> Path:
    """Where shard `number` of the cache entry `entry` lives."""
    return entry / "shards" / f"{number:05d}"


def write_shard(entry: Path, number: int, rows: list[EncodedRow], report: PreparationReport, *,
                first_row: int, conversations: int) -> None:
    """Write the rows of one chunk (`conversations` conversations from source row `first_row` on) atomically."""
    target = shard_folder(entry, number)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        for name, values in _shard_arrays(rows).items():
            np.save(tmp / f"{name}.npy", values, allow_pickle=False)
        (tmp / "report.json").write_text(json.dumps(report_to_json(report)))
        files = {path.name: _checksum(path) for path in sorted(tmp.iterdir())}
        meta = {"format": SHARD_FORMAT, "first_row": first_row, "conversations": conversations,
                "rows": len(rows), "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if target.exists():  # a shard that did not check out: replaced, never trusted
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shard_arrays(rows: list[EncodedRow]) -> dict[str, np.ndarray]:
    lengths = np.fromiter((len(r.input_ids) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    input_ids = np.fromiter((t for r in rows for t in r.input_ids), dtype=np.int64, count=total)
    labels = np.fromiter((t for r in rows for t in r.labels), dtype=np.int64, count=total)
    roles = np.fromiter((t for r in rows for t in r.roles), dtype=np.int64, count=total)
    trained = labels != IGNORE_INDEX
    # Encoding scores a token by making its label the token itself (docs/masking.md): one bit says it all.
    if not np.array_equal(labels[trained], input_ids[trained]) or roles.size and roles.max() >= TRAINED:
        raise ValueError("a row's labels are not its own tokens or -100: they cannot be stored as a mask")
    return {
        "input_ids": input_ids.astype(np.int32),
        "offsets": offsets,
        "marks": (roles | np.where(trained, TRAINED, 0)).astype(np.uint8),
        "rows": np.array([r.row for r in rows], dtype=np.int64),
        "turns": np.array([-1 if r.turn is None else r.turn for r in rows], dtype=np.int32),
        "truncated": np.array([r.truncated for r in rows], dtype=np.bool_),
    }


def _checksum(path: Path) -> list[int]:
    """(size, CRC-32) of a file: enough to tell a whole file from a cut or damaged one."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return [path.stat().st_size, crc]


# -- checking and reading back -------------------------------------------------------------------------

def finished_shard(entry: Path, number: int, *, first_row: int, conversations: int,
                   verify: bool = True) -> PreparationReport | None:
    """The report of shard `number` when it is whole and holds exactly this chunk; else None.

    `verify` reads every file to compare its checksum; without it only the sizes are compared.
    """
    folder = shard_folder(entry, number)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if (meta.get("format"), meta.get("first_row"), meta.get("conversations")) != (
                SHARD_FORMAT, first_row, conversations):
            return None
        for name, (size, crc) in meta["files"].items():
            path = folder / name
            if (verify and _checksum(path) != [size, crc]) or (not verify and path.stat().st_size != size):
                return None
        return report_from_json(json.loads((folder / "report.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def report_to_json(report: PreparationReport) -> dict:
    """The report as JSON, without `lengths` (the shards' offsets hold them)."""
    values = asdict(report)
    del values["lengths"]
    return values


def report_from_json(values: dict) -> PreparationReport:
    """The inverse of `report_to_json` (with empty `lengths`)."""
    values = dict(values)
    values["drops"] = [(int(row), str(reason)) for row, reason in values.get("drops", [])]
    return PreparationReport(**values)


def write_manifest(entry: Path, shards: list[dict], report: PreparationReport) -> None:
    """Mark the entry finished: its shards in order (`number`, `first_row`, `conversations`) and the report."""
    tmp = entry / "manifest.json.tmp"
    try:
        tmp.write_text(json.dumps({"format": SHARD_FORMAT, "shards": shards, "report": report_to_json(report)}))
        os.replace(tmp, entry / "manifest.json")
    finally:
        tmp.unlink(missing_ok=True)


def cache_full_error(entry: Path, conversations: int) -> UserError:
    """The error of a preparation that filled the disk: the cache entry, and about how much room the whole
    of it needs, judged from the shards finished so far (which stay, for the next run to keep)."""
    done, written = 0, 0
    for meta in entry.glob("shards/*/meta.json"):
        try:
            values = json.loads(meta.read_text())
            done += int(values["conversations"])
            written += sum(size for size, _ in values["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    needed = round(written / done * conversations) if done else None
    kept = f"the {human_size(written)} of shards finished so far are kept and reused; " if done else ""
    return disk_full_error(entry, needed, hint=f"{kept}free some space, or set INSTRUCTUNE_CACHE to a folder "
                                                "with room, and run again")


def load_manifest(entry: Path) -> tuple[ShardedRows, PreparationReport] | None:
    """The rows and encoding report of a finished entry, or None when it is missing or a shard is not whole
    (cut short or damaged: every file's size and checksum are checked)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest.get("format") != SHARD_FORMAT:
            return None
        shards = manifest["shards"]
        for shard in shards:
            if finished_shard(entry, shard["number"], first_row=shard["first_row"],
                              conversations=shard["conversations"]) is None:
                return None
        return ShardedRows([shard_folder(entry, s["number"]) for s in shards]), report_from_json(manifest["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RowSequence(Sequence):
    """What the memory-mapped row sequences share: slicing to lists, comparing and adding like lists."""

    lengths: np.ndarray
    """Token length of every row, in order (without building the rows)."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("row index out of range")
        return self._row(index)

    def __len__(self) -> int:
        return len(self.lengths)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __add__(self, other) -> list[EncodedRow]:
        return list(self) + list(other)

    def __radd__(self, other) -> list[EncodedRow]:
        return list(other) + list(self)

    def _row(self, index: int) -> EncodedRow:
        raise NotImplementedError


class ShardedRows(RowSequence):
    """The rows of a cache entry's shards, in order, each made into an `EncodedRow` when asked for."""

    def __init__(self, folders: list[Path]):
        self._shards = [{name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                         for name in ARRAYS} for folder in folders]
        counts = [len(shard["rows"]) for shard in self._shards]
        self._starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._starts[1:])
        self.lengths = np.concatenate([np.diff(s["offsets"]) for s in self._shards]).astype(np.int32) \
            if self._shards else np.zeros(0, dtype=np.int32)
        self.source_rows = np.concatenate([s["rows"] for s in self._shards]) if self._shards \
            else np.zeros(0, dtype=np.int64)
        """The source row of every row, in order (without building the rows)."""

    def _row(self, index: int) -> EncodedRow:
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        shard, i = self._shards[number], index - int(self._starts[number])
        start, end = int(shard["offsets"][i]), int(shard["offsets"][i + 1])
        ids = np.asarray(shard["input_ids"][start:end], dtype=np.int64)
        marks = np.asarray(shard["marks"][start:end])
        turn = int(shard["turns"][i])
        return EncodedRow(row=int(shard["rows"][i]), input_ids=ids.tolist(),
                          labels=np.where(marks & TRAINED, ids, IGNORE_INDEX).tolist(),
                          roles=(marks & ~np.uint8(TRAINED)).astype(np.int64).tolist(),
                          truncated=bool(shard["truncated"][i]), turn=None if turn < 0 else turn)


class RowView(RowSequence):
    """Some rows of a `RowSequence` (such as the training split), by their positions in it."""

    def __init__(self, base: RowSequence, positions: Sequence[int]):
        self._base = base
        self._positions = np.asarray(positions, dtype=np.int64)
        self.lengths = base.lengths[self._positions]

    def _row(self, index: int) -> EncodedRow:
        return self._base[int(self._positions[index])]


def select_rows(rows: Sequence[EncodedRow], positions: Sequence[int]) -> Sequence[EncodedRow]:
    """The rows at `positions`, in that order: a view of memory-mapped rows, a list of a list."""
    if isinstance(rows, RowSequence):
        return RowView(rows, positions)
    return [rows[i] for i in positions]


def row_lengths(rows: Sequence[EncodedRow]) -> list[int]:
    """The token length of every row, without building memory-mapped rows."""
    if isinstance(rows, RowSequence):
        return rows.lengths.tolist()
    return [len(row) for row in rows]


def source_rows(rows: Sequence[EncodedRow]) -> np.ndarray:
    """The source row (`EncodedRow.row`) of every row, without building memory-mapped rows."""
    if isinstance(rows, ShardedRows):
        return np.asarray(rows.source_rows, dtype=np.int64)
    return np.fromiter((row.row for row in rows), dtype=np.int64, count=len(rows))


def row_digests(rows: Sequence[EncodedRow]) -> list[bytes]:
    """An 8-byte digest of every row's tokens and of which of them are trained: equal for two rows exactly
    when training sees the same row (memory-mapped or in a list alike)."""
    import hashlib

    def digest(ids: np.ndarray, trained: np.ndarray) -> bytes:
        return hashlib.blake2b(ids.tobytes() + trained.tobytes(), digest_size=8).digest()

    if isinstance(rows, ShardedRows):
        digests = []
        for shard in rows._shards:
            ids, offsets = np.asarray(shard["input_ids"], dtype=np.int32), np.asarray(shard["offsets"])
            trained = ((np.asarray(shard["marks"]) & TRAINED) != 0).astype(np.uint8)
            digests += [digest(ids[a:b], trained[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return digests
    return [digest(np.asarray(row.input_ids, dtype=np.int32),
                   (np.asarray(row.labels) != IGNORE_INDEX).astype(np.uint8)) for row in rows]


def lengths_of(rows: RowSequence) -> array:
    """`rows.lengths` as a report keeps them."""
    lengths = length_array()
    lengths.frombytes(np.ascontiguousarray(rows.lengths, dtype=np.int32).tobytes())
    return lengths
