"""Shared pieces of the training tests: a tiny model folder, a learnable toy dataset, quick configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Tiny models gain nothing from a second thread, and on a shared CPU two spinning OpenMP threads can
# make every op wait for a descheduled peer.
torch.set_num_threads(1)

QA_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Which is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("Hello", "Hello world! How are you?"),
    ("How are you?", "I am fine, thank you."),
]


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Save a random 2-layer Llama and the in-process ChatML tokenizer into `folder`."""
    from instructune.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), hidden_size=32, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_toy_data(path: Path, rows: int = 48) -> Path:
    """Alpaca rows cycling through four question-answer pairs: easy to learn, so the loss must fall."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            question, answer = QA_PAIRS[i % len(QA_PAIRS)]
            out.write(json.dumps({"instruction": question, "output": answer}) + "\n")
    return path


def quick_settings(model: Path, data: Path, output_dir: Path, **extra) -> list[str]:
    """`key=value` overrides for a run of a few seconds on the tiny model."""
    settings = {"model": str(model), "data": str(data), "output_dir": str(output_dir), "batch_size": 4,
                "lr": 1e-2, "max_steps": 12, "eval_every": 4, "save_every": 4, "keep_last": 10, "log_every": 4}
    settings.update(extra)
    return [f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"
            for key, value in settings.items()]


def train_records(output_dir: Path) -> list[dict]:
    """The training rows of a run's metrics.jsonl, without the wall-clock fields."""
    from instructune.train.metrics import read_metrics

    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
            for r in read_metrics(output_dir)]


def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the torchrun worker processes whose parent is `parent` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                for variable in (entry / "environ").read_bytes().split(b"\0"):
                    if variable.startswith(b"RANK="):
                        found[int(variable[5:])] = int(entry.name)
        except OSError:  # the process has just ended
            continue
    return found
