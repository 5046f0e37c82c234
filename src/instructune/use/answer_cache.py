"""Results about a model kept on disk, keyed by what they depend on, so that they are not computed twice.

The default job asks the base model the same held-out questions every time it runs (minutes on a slow
CPU) and gets the same greedy answers: `cached_result` keeps them (and the base model's evaluation) in
`<cache>/base_answers/`, keyed by a fingerprint of the model's weights (`weights_fingerprint`) and by
everything else the result depends on (the prompt token ids, the generation settings, the library
versions), so a changed model, question, template or setting simply misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from instructune.cache import cache_dir

CACHE_FOLDER = "base_answers"
FORMAT = 1
"""Part of every key: raise it when what an entry holds changes, or when a change to generation or
evaluation would change their results (old entries then simply miss)."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the model's state (name, dtype, shape, bytes); a tied weight counts once."""
    digest = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if where in seen:  # tied to a tensor already hashed (the LM head and the embedding)
            continue
        seen.add(where)
        # Raw bytes through a uint8 view: works for every dtype (bf16 has no numpy type), no copy when contiguous.
        digest.update(memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def result_key(fingerprint: str, **depends_on: Any) -> str:
    """The cache key of a result that depends on the weights `fingerprint` and on `depends_on` (JSON values)."""
    described = json.dumps({"format": FORMAT, "weights": fingerprint, "torch": torch.__version__, **depends_on},
                           sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


def cache_path(key: str) -> Path:
    """Where the result of `key` is kept."""
    return cache_dir() / CACHE_FOLDER / f"{key}.json"


def cached_result(key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(the result of `key`, whether it came from the cache): read it, or `compute()` it and keep it."""
    path = cache_path(key)
    try:
        return json.loads(path.read_text(encoding="utf-8"))["result"], True
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or unreadable: compute it again
        pass
    result = compute()
    _write(path, {"result": result})
    return result, False


def _write(path: Path, value: dict) -> None:
    """Write `value` as JSON at `path` atomically (a concurrent run reads the old file or the new one);
    a cache that cannot be written is not an error."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(value, out, ensure_ascii=False)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
