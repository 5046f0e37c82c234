"""Sources: JSON, JSONL, Parquet, CSV, folders and Hub datasets, and the rows each error names."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from data_fixtures import ALPACA_ROWS, A, U, alpaca_user, write_json, write_jsonl
from instructune.data.conversation import Conversation, Message
from instructune.data.formats import FORMATS
from instructune.data.readers import ReadResult, read_conversations
from instructune.data.stream import SKIP_HINT
from instructune.errors import UserError

ALPACA_CONVS = [(i, Conversation(messages=[alpaca_user(f"q{i}"), Message(A, f"a{i}")])) for i in range(3)]


def test_json_list(tmp_path):
    result = read_conversations(write_json(tmp_path / "d.json", ALPACA_ROWS))
    assert result == ReadResult(conversations=ALPACA_CONVS, rows_read=3, bad_rows=0, bad_row_messages=[], format="alpaca")


def test_json_dict_holding_one_list(tmp_path):
    result = read_conversations(write_json(tmp_path / "d.json", {"version": "1", "data": ALPACA_ROWS}))
    assert result.conversations == ALPACA_CONVS


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_json_wrapper_and_single_record_of_every_registered_format(fmt, tmp_path):
    # Telling a wrapper ({"data": [...]}) from one record depends on the marker keys of the registry.
    wrapped = read_conversations(write_json(tmp_path / "wrapped.json", {"version": "1", "data": [fmt.example] * 2}))
    single = read_conversations(write_json(tmp_path / "single.json", fmt.example))
    assert (wrapped.rows_read, single.rows_read) == (2, 1)
    assert wrapped.format == single.format == fmt.name


def test_json_single_record_object(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    result = read_conversations(write_json(tmp_path / "d.json", record))
    assert result.conversations == [(0, Conversation(messages=[Message(U, "a"), Message(A, "b")]))]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ALPACA_ROWS[0]) + "\n   \n" + json.dumps(ALPACA_ROWS[1]) + "\n"
                    + json.dumps(ALPACA_ROWS[2]))
    result = read_conversations(path)
    assert result.conversations == ALPACA_CONVS and result.rows_read == 3


def test_jsonl_errors_name_the_line_counting_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl, line 3, field 'output': missing key 'output'"):
        read_conversations(path)


def test_parquet_written_with_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "a", "name": None}, {"role": "assistant", "content": "b", "name": None}]},
        {"messages": [{"role": "user", "content": "c", "name": "bob"}, {"role": "assistant", "content": "d", "name": None}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    result = read_conversations(tmp_path / "d.parquet")
    # Parquet fills absent struct fields with null; they must not become extra fields.
    assert result.conversations == [
        (0, Conversation(messages=[Message(U, "a"), Message(A, "b")])),
        (1, Conversation(messages=[Message(U, "c", extra={"name": "bob"}), Message(A, "d")])),
    ]
    assert result.format == "messages"


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"d\.parquet, row 1, field 'text': expected a string, got null"):
        read_conversations(tmp_path / "d.parquet")


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv(tmp_path):
    rows = ALPACA_ROWS[:2] + [{"instruction": "long", "input": "x" * 200_000, "output": "ok"}]
    result = read_conversations(write_csv(tmp_path / "d.csv", rows))
    assert result.conversations[:2] == ALPACA_CONVS[:2]
    assert result.conversations[2][1].messages[0].content == "long\n\n" + "x" * 200_000


def test_csv_messages_as_json_strings(tmp_path):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    result = read_conversations(write_csv(tmp_path / "d.csv", [{"messages": json.dumps(messages)}]))
    assert result.conversations == [(0, Conversation(messages=[Message(U, "a"), Message(A, "b")]))]


def test_csv_errors_name_the_row_not_counting_the_header(tmp_path):
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(UserError, match=r"d\.csv, row 0, field 'messages': the conversation is empty"):
        read_conversations(write_csv(tmp_path / "d.csv", [{"messages": "[]"}]))
    with pytest.raises(UserError, match=r"d\.csv, row 1, field 'messages': .*not valid JSON"):
        read_conversations(write_csv(tmp_path / "d.csv", [{"messages": good}, {"messages": "not json"}]))


def test_folder_reads_files_sorted_and_counts_rows_across_them(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ALPACA_ROWS[1:3])
    write_json(folder / "a.json", ALPACA_ROWS[:1])
    (folder / "README.md").write_text("not data")
    sub = folder / "c"
    sub.mkdir()
    write_csv(sub / "rows.csv", [{"instruction": "q3", "input": "", "output": "a3"}])
    result = read_conversations(folder)
    assert result.rows_read == 4
    assert result.conversations == ALPACA_CONVS + [(3, Conversation(messages=[alpaca_user("q3"), Message(A, "a3")]))]


def test_folder_row_indices_count_bad_rows_and_errors_name_the_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [ALPACA_ROWS[0], {"instruction": "no output"}])
    write_jsonl(folder / "2.jsonl", [ALPACA_ROWS[1]])
    result = read_conversations(folder, on_bad_row="skip")
    assert [index for index, _ in result.conversations] == [0, 2]
    assert result.bad_row_messages == [
        f"{folder / '1.jsonl'}, line 2, field 'output': missing key 'output' (the record has keys 'instruction')"
    ]


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no data files"):
        read_conversations(tmp_path)


def test_hub_name_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return [{"prompt": "a", "completion": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = read_conversations("someone/some-data:validation")
    assert calls == [("someone/some-data", "validation")]
    assert result.conversations == [(0, Conversation(messages=[Message(U, "a"), Message(A, "b")]))]
    read_conversations("some-data")
    assert calls[-1] == ("some-data", "train")


def test_hub_name_that_cannot_be_loaded(monkeypatch):
    import datasets

    def offline(name, split=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        read_conversations("someone/missing-data")
    assert str(info.value) == (
        "someone/missing-data: no such local file or folder, and it could not be loaded as a Hugging Face "
        "dataset (ConnectionError: Couldn't reach 'someone/missing-data' on the Hub)"
    )


def test_missing_file_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try the Hub"))
    for name in ("train.json", "data/train.jsonl", str(tmp_path / "missing"), "./local"):
        with pytest.raises(UserError, match="no such file or folder"):
            read_conversations(name)


def test_unknown_extension(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match=r"d\.txt: unknown file type '\.txt'"):
        read_conversations(tmp_path / "d.txt")


def test_invalid_json_file_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "d.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"d\.json: not a valid JSON file: Extra data.*name the file \.jsonl"):
        read_conversations(tmp_path / "d.json", on_bad_row="skip")


def test_json_object_with_several_lists(tmp_path):
    with pytest.raises(UserError, match="exactly one list.*'train', 'test'"):
        read_conversations(write_json(tmp_path / "d.json", {"train": [], "test": []}))


def test_reading_999_alpaca_rows_is_fast(tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "x" * (i % 3), "output": "An answer. " * 60} for i in range(999)]
    path = write_json(tmp_path / "alpaca.json", rows)
    start = time.perf_counter()
    result = read_conversations(path)
    assert time.perf_counter() - start < 0.5
    assert len(result.conversations) == 999


def test_invalid_json_line_names_the_line_and_the_json_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + '\n{"text": "unterminated\n')
    with pytest.raises(UserError) as info:
        read_conversations(path)
    assert str(info.value) == (f"{path}, line 2: invalid JSON (Unterminated string starting at column 10)"
                               f"{SKIP_HINT}")
    assert "--on-bad-row skip" in SKIP_HINT  # the way past a few broken lines in a large file


def test_badly_encoded_jsonl_line_is_one_bad_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    result = read_conversations(path, on_bad_row="skip")
    assert result.bad_rows == 1 and result.bad_row_messages[0].startswith(f"{path}, line 2: invalid JSON (not UTF-8")
