"""Reading a source into conversations: the format detected or given, bad rows raised or skipped and counted."""

from __future__ import annotations

import json

import pytest

from data_fixtures import error_of, read_one, write_jsonl
from instructune.data.conversation import Conversation
from instructune.data.readers import read_conversations
from instructune.errors import UserError

# ---- the format ---------------------------------------------------------------------------------


def test_detected_format_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}])
    assert read_conversations(path).format == "sharegpt"


def test_format_override_beats_detection(tmp_path):
    record = {"instruction": "Hi", "output": "Hello", "text": "Hi -> Hello"}
    assert read_one(tmp_path, record, data_format="text") == Conversation(text="Hi -> Hello")
    assert read_conversations(tmp_path / "data.jsonl").format == "alpaca"


def test_override_with_missing_key_names_the_row_and_keys(tmp_path):
    message = error_of(tmp_path, [{"instruction": "a", "output": "b"}], data_format="messages")
    assert message.startswith(str(tmp_path / "data.jsonl") + ", line 1, field 'messages': missing key 'messages'")
    assert "'instruction', 'output'" in message


def test_a_bad_row_error_names_file_line_and_field_and_the_way_to_skip_such_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a", "output": 3})
                    + "\n" + '{"instruction": "a", "output": \n')
    with pytest.raises(UserError) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}, line 2, field 'output': ")
    assert str(info.value).endswith("(to skip bad rows instead: --on-bad-row skip, or on_bad_row=skip for instructune train)")
    # The broken JSON line (the case) says the same; skipping then keeps the good row.
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + '{"instruction": "a", "output": \n')
    with pytest.raises(UserError, match=r"line 2: invalid JSON .*--on-bad-row skip"):
        read_conversations(path)
    assert len(read_conversations(path, on_bad_row="skip").conversations) == 1


# ---- skip mode ----------------------------------------------------------------------------------


def test_skip_mode_counts_bad_rows_and_keeps_the_first_five_messages(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "first"}), "{broken"]
    lines += [json.dumps({"text": 1})] * 6
    lines += ["[]", json.dumps({"text": "last"})]
    path.write_text("\n".join(lines) + "\n")
    result = read_conversations(path, on_bad_row="skip")
    assert result.rows_read == 10
    assert result.bad_rows == 8
    assert result.format == "text"
    assert result.conversations == [(0, Conversation(text="first")), (9, Conversation(text="last"))]
    assert len(result.bad_row_messages) == 5
    assert result.bad_row_messages[0].startswith(f"{path}, line 2: invalid JSON")
    assert result.bad_row_messages[1] == f"{path}, line 3, field 'text': expected a string, got int"


def test_skip_mode_detects_the_format_from_the_first_readable_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('not json\n"a string"\n' + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    result = read_conversations(path, on_bad_row="skip")
    assert result.format == "prompt_completion" and result.bad_rows == 2
    assert [index for index, _ in result.conversations] == [2]


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": ""}, {"text": 2}])
    with pytest.raises(UserError, match=r"all 2 rows are bad, nothing to train on; the first: .*line 1, field 'text'"):
        read_conversations(path, on_bad_row="skip")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "data.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no rows"):
        read_conversations(tmp_path / "data.jsonl")


def test_unknown_on_bad_row(tmp_path):
    with pytest.raises(UserError, match="on_bad_row must be one of error, skip"):
        read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]), on_bad_row="warn")
