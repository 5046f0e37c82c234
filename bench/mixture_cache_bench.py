"""Changing one source of a mixture re-encodes that source only: the time of a cold preparation, a warm
one (every source cached), and one after a row is appended to one source, with the real SmolLM2 tokenizer.

    .venv/bin/python bench/mixture_cache_bench.py

The sources are copies (in a temporary folder) of the 999-row Alpaca demo (tests/fixtures/data), the
default job's 456 questions and the 320 rows of very unequal lengths; the cache is a fresh temporary
folder, so nothing outside it is read or written. Prints the machine's load (`os.getloadavg`) beside
the timings: the machine may be shared.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from instructune.data.mixture import prepare_mixture
from instructune.data.mixture_sources import parse_sources
from instructune.data.options import EncodingOptions
from instructune.model.load import DEFAULT_MODEL, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"demo.json": ROOT / "tests/fixtures/data/alpaca_en_demo.json",
           "qa.jsonl": ROOT / "src/instructune/resources/default_qa/train.jsonl",
           "lengths.jsonl": ROOT / "src/instructune/resources/alpaca_lengths/rows.jsonl"}


def timed(label: str, sources, tokenizer, cache: Path) -> None:
    start = time.perf_counter()
    mixture = prepare_mixture(sources, tokenizer, EncodingOptions(max_length=512), eval_split=0.05,
                              cache_dir=cache, num_proc=1)
    seconds = time.perf_counter() - start
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{label:<40} {seconds:6.2f} s   {len(mixture.train_rows):,} training rows   load {load}")


def main() -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, path in SOURCES.items():
            shutil.copy(path, folder / name)
        sources = parse_sources([{"path": str(folder / "demo.json"), "rows": 600},
                                 {"path": str(folder / "qa.jsonl"), "weight": 1},
                                 {"path": str(folder / "lengths.jsonl"), "weight": 1}])
        cache = folder / "cache"
        timed("cold: every source encoded", sources, tokenizer, cache)
        timed("warm: every source from the cache", sources, tokenizer, cache)
        with (folder / "qa.jsonl").open("a") as f:
            f.write(json.dumps({"instruction": "What is the capital of Peru?", "output": "Lima."}) + "\n")
        timed("qa.jsonl + 1 row: qa re-encoded only", sources, tokenizer, cache)
        entries = sorted(p.name for p in (cache / "prepared").iterdir())
        print(f"cache entries: {len(entries)} (3 sources, then 1 more for the changed one)")


if __name__ == "__main__":
    main()
