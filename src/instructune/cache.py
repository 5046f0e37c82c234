"""Where instructune keeps what it can make again: converted GGUF models and prepared datasets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$INSTRUCTUNE_CACHE` when set and not empty, else `~/.cache/instructune`."""
    return Path(os.environ.get("INSTRUCTUNE_CACHE") or Path.home() / ".cache" / "instructune").expanduser()
