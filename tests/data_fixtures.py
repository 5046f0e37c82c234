"""Shared pieces of the data-reading tests: writing records to files, reading one back, the error of a read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation, Message
from instructune.data.readers import read_conversations
from instructune.errors import UserError

U, A, S, T = "user", "assistant", "system", "tool"

ALPACA_ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]


def alpaca_user(instruction: str, extra_input: str = "") -> Message:
    """The user turn the Alpaca reader makes: content, plus the fields the `alpaca` template reads apart."""
    content = "\n\n".join(part for part in (instruction, extra_input) if part)
    return Message(U, content, extra={"instruction": instruction, "input": extra_input})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def read_one(tmp_path: Path, record: dict, **kwargs) -> Conversation:
    result = read_conversations(write_jsonl(tmp_path / "data.jsonl", [record]), **kwargs)
    assert result.rows_read == 1 and result.bad_rows == 0
    return result.conversations[0][1]


def error_of(tmp_path: Path, records: list, name: str = "data.jsonl", **kwargs) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, records)
    else:
        write_json(path, records)
    with pytest.raises(UserError) as info:
        read_conversations(path, **kwargs)
    return str(info.value)


def trained_runs(row) -> list[list[int]]:
    """The runs of consecutive trained tokens of an encoded row, in order (one per trained turn, usually)."""
    runs, current = [], []
    for token_id, label in zip(row.input_ids, row.labels):
        if label != IGNORE_INDEX:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
