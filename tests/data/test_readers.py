"""Dataset readers: every format into exact canonical conversations, every source, every bad input."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from instructune.data.conversation import Conversation, Message
from instructune.data.readers import ReadResult, detect_format, read_conversations
from instructune.errors import UserError

U, A, S, T = "user", "assistant", "system", "tool"


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


# ---- formats ------------------------------------------------------------------------------------


def test_alpaca_without_input_and_extra_keys_ignored(tmp_path):
    record = {"instruction": "Name an ocean.", "input": "", "output": "The Pacific.", "answer": "Pacific"}
    assert read_one(tmp_path, record) == Conversation(
        messages=[alpaca_user("Name an ocean."), Message(A, "The Pacific.")]
    )


def test_alpaca_input_follows_instruction_after_a_blank_line(tmp_path):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert read_one(tmp_path, record) == Conversation(
        messages=[alpaca_user("Add the numbers.", "2 and 3"), Message(A, "5")]
    )


def test_alpaca_without_input_key(tmp_path):
    assert read_one(tmp_path, {"instruction": "Hi", "output": "Hello"}).messages == [
        alpaca_user("Hi"), Message(A, "Hello")
    ]


def test_alpaca_with_system_and_history(tmp_path):
    record = {
        "system": "Be brief.",
        "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]],
        "instruction": "And 3+3?",
        "input": "",
        "output": "6",
    }
    assert read_one(tmp_path, record) == Conversation(messages=[
        Message(S, "Be brief."),
        Message(U, "What is 1+1?"), Message(A, "2"),
        Message(U, "And 2+2?"), Message(A, "4"),
        alpaca_user("And 3+3?"), Message(A, "6"),
    ])


def test_prompt_completion_strings(tmp_path):
    assert read_one(tmp_path, {"prompt": "The sky is", "completion": " blue."}) == Conversation(
        messages=[Message(U, "The sky is"), Message(A, " blue.")]
    )


def test_prompt_completion_message_lists_only_train_the_completion(tmp_path):
    record = {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "train": True},
            {"role": "user", "content": "Bye"},
        ],
        "completion": [{"role": "assistant", "content": "Goodbye!"}],
    }
    assert read_one(tmp_path, record) == Conversation(messages=[
        Message(S, "Be kind."),
        Message(U, "Hi"),
        Message(A, "Hello!", train=False),
        Message(U, "Bye"),
        Message(A, "Goodbye!"),
    ])


def test_prompt_completion_string_prompt_with_message_completion(tmp_path):
    record = {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello"}]}
    assert read_one(tmp_path, record).messages == [Message(U, "Hi"), Message(A, "Hello")]


def test_messages_with_tools_tool_calls_and_null_content(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    record = {
        "messages": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Use the tool."},
            {"role": "tool", "content": "18C", "tool_call_id": "c1", "name": "get_weather"},
            {"role": "assistant", "content": "It is 18C.", "train": False, "name": None},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome.", "weight": 1},
        ],
        "tools": tools,
        "answer": "ignored",
    }
    assert read_one(tmp_path, record) == Conversation(
        messages=[
            Message(S, "You can call tools."),
            Message(U, "Weather in Paris?"),
            Message(A, "", extra={"tool_calls": [call], "reasoning_content": "Use the tool."}),
            Message(T, "18C", extra={"tool_call_id": "c1", "name": "get_weather"}),
            Message(A, "It is 18C.", train=False),
            Message(U, "Thanks"),
            Message(A, "You're welcome.", train=True),
        ],
        tools=tools,
    )


def test_messages_weight_zero_means_not_trained(tmp_path):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}
    assert read_one(tmp_path, record).messages[1] == Message(A, "b", train=False)


def test_sharegpt_every_speaker_alias(tmp_path):
    speakers = {
        "system": S, "human": U, "gpt": A, "user": U, "assistant": A, "model": A, "bot": A, "chatgpt": A,
        "function_call": A, "observation": T, "tool": T, "function": T, "function_response": T,
    }
    record = {"conversations": [{"from": name, "value": f"v{i}"} for i, name in enumerate(speakers)]}
    expected = [Message(role, f"v{i}") for i, role in enumerate(speakers.values())]
    assert read_one(tmp_path, record).messages == expected


def test_sharegpt_function_call_observation_system_and_tools(tmp_path):
    tools = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}]
    record = {
        "system": "You are a helper.",
        "tools": json.dumps(tools),  # LLaMA-Factory stores tools as a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "18C"},
            {"from": "gpt", "value": "It is 18C.", "weight": 0},
            {"from": "Human", "value": "Thanks"},
            {"role": "assistant", "content": "Welcome.", "loss": "full"},
        ],
    }
    assert read_one(tmp_path, record) == Conversation(
        messages=[
            Message(S, "You are a helper."),
            Message(U, "Weather in Paris?"),
            Message(A, '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
            Message(T, "18C"),
            Message(A, "It is 18C.", train=False),
            Message(U, "Thanks"),
            Message(A, "Welcome.", extra={"loss": "full"}),
        ],
        tools=tools,
    )


def test_sharegpt_tools_as_list_and_empty_system(tmp_path):
    tools = [{"name": "f"}]
    record = {"system": "", "tools": tools, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert read_one(tmp_path, record) == Conversation(messages=[Message(U, "a"), Message(A, "b")], tools=tools)


def test_text(tmp_path):
    assert read_one(tmp_path, {"text": "Once upon a time."}) == Conversation(text="Once upon a time.")


# ---- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "", "input": "", "output": ""}, "alpaca"),
    ({"instruction": "", "output": "", "text": "### Instruction: ..."}, "alpaca"),
    ({"prompt": "", "completion": ""}, "prompt_completion"),
    ({"prompt": "", "messages": []}, "messages"),
    ({"messages": []}, "messages"),
    ({"conversations": [], "system": ""}, "sharegpt"),
    ({"text": ""}, "text"),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detected_format_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}])
    assert read_conversations(path).format == "sharegpt"


def test_format_override_beats_detection(tmp_path):
    record = {"instruction": "Hi", "output": "Hello", "text": "Hi -> Hello"}
    assert read_one(tmp_path, record, data_format="text") == Conversation(text="Hi -> Hello")
    assert read_conversations(tmp_path / "data.jsonl").format == "alpaca"


def test_format_name_accepts_hyphens(tmp_path):
    result = read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}]),
                                data_format="prompt-completion")
    assert result.format == "prompt_completion"


def test_unknown_format_name(tmp_path):
    with pytest.raises(UserError, match="unknown data format 'vicuna'.*alpaca"):
        read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]), data_format="vicuna")


def test_override_with_missing_key_names_the_row_and_keys(tmp_path):
    message = error_of(tmp_path, [{"instruction": "a", "output": "b"}], data_format="messages")
    assert message.startswith(str(tmp_path / "data.jsonl") + ", line 1, field 'messages': missing key 'messages'")
    assert "'instruction', 'output'" in message


def test_undetectable_first_record_names_its_keys_and_the_known_formats(tmp_path):
    message = error_of(tmp_path, [{"question": "a", "response": "b"}])
    assert "data.jsonl, line 1" in message
    assert "'question', 'response'" in message
    for name in ("alpaca", "prompt_completion", "messages", "sharegpt", "text"):
        assert name in message


# ---- sources ------------------------------------------------------------------------------------

ALPACA_ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
ALPACA_CONVS = [(i, Conversation(messages=[alpaca_user(f"q{i}"), Message(A, f"a{i}")])) for i in range(3)]


def test_json_list(tmp_path):
    result = read_conversations(write_json(tmp_path / "d.json", ALPACA_ROWS))
    assert result == ReadResult(conversations=ALPACA_CONVS, rows_read=3, bad_rows=0, bad_row_messages=[], format="alpaca")


def test_json_dict_holding_one_list(tmp_path):
    result = read_conversations(write_json(tmp_path / "d.json", {"version": "1", "data": ALPACA_ROWS}))
    assert result.conversations == ALPACA_CONVS


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


# ---- bad rows -----------------------------------------------------------------------------------

GOOD = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}


def sharegpt(*turns, **top) -> dict:
    return {"conversations": list(turns), **top}


@pytest.mark.parametrize("bad, expected", [
    (sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "narrator", "value": "c"}),
     "line 2, field 'conversations[2].from': unknown speaker 'narrator' (expected one of human, user, gpt,"),
    (sharegpt({"from": "human", "value": 3}, {"from": "gpt", "value": "b"}),
     "line 2, field 'conversations[0].value': expected a string, got int"),
    (sharegpt({"from": "human", "value": None}, {"from": "gpt", "value": "b"}),
     "line 2, field 'conversations[0].value': expected a string, got null"),
    (sharegpt({"value": "a"}, {"from": "gpt", "value": "b"}),
     "line 2, field 'conversations[0].role': missing key 'role'"),
    (sharegpt({"from": "human", "value": "a"}), "line 2, field 'conversations': the conversation has no assistant turn"),
    (sharegpt(), "line 2, field 'conversations': the conversation is empty"),
    (sharegpt("hi", {"from": "gpt", "value": "b"}), "line 2, field 'conversations[0]': expected a message object, got str"),
    ({"conversations": "hello"}, "line 2, field 'conversations': expected a list or a JSON string of one; not valid JSON"),
    ({"conversations": {"from": "human"}}, "line 2, field 'conversations': expected a list of messages, got dict"),
    (sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "weight": 0.5}),
     "line 2, field 'conversations[1].weight': weight must be 0 or 1, got 0.5"),
    (sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "train": "yes"}),
     "line 2, field 'conversations[1].train': train must be true or false, got 'yes'"),
    (sharegpt({"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}, system="S"),
     "line 2, field 'system': the record has a top-level system prompt and also starts with a system turn"),
    (sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, tools=7),
     "line 2, field 'tools': expected a list of tool definitions (objects), got int"),
    (sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, system=["s"]),
     "line 2, field 'system': expected a string, got list"),
    (["not", "an", "object"], "line 2: expected a record (a JSON object), got list"),
    (None, "line 2: expected a record (a JSON object), got null"),
])
def test_bad_sharegpt_rows(tmp_path, bad, expected):
    message = error_of(tmp_path, [GOOD, bad])
    assert message.startswith(str(tmp_path / "data.jsonl") + ", " + expected), message


def test_unknown_speaker_message_reads_like_the_issue(tmp_path):
    rows = [GOOD] * 6 + [sharegpt({"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                  {"from": "narrator", "value": "c"})]
    message = error_of(tmp_path, rows)
    assert message.startswith(f"{tmp_path / 'data.jsonl'}, line 7, field 'conversations[2].from': "
                              "unknown speaker 'narrator' (expected one of human, user, gpt, assistant,")


@pytest.mark.parametrize("bad, expected", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "field 'messages[1].role': unknown role 'robot' (expected one of system, user, assistant, tool)"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     "field 'messages[0].content[0]': expected a content part {type: text, text: ...}, got str"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   {"role": "assistant", "content": "b"}]},
     "field 'messages[0].content[0].type': unsupported content part type 'image_url'"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]},
     "field 'messages[0].content': expected a string, got null"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     "field 'messages[0].content': missing key 'content'"),
    ({"messages": [{"role": "user", "content": {"text": "a"}}, {"role": "assistant", "content": "b"}]},
     "field 'messages[0].content': expected a string, got dict"),
    ({"messages": [{"role": "user", "content": "a"}]}, "field 'messages': the conversation has no assistant turn"),
    ({"messages": []}, "field 'messages': the conversation is empty"),
    ({"text": "a"}, "field 'messages': missing key 'messages' (the record has keys 'text')"),
])
def test_bad_messages_rows(tmp_path, bad, expected):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    message = error_of(tmp_path, [good, good, bad], name="data.json")
    assert message.startswith(f"{tmp_path / 'data.json'}, row 2, {expected}"), message


@pytest.mark.parametrize("bad, expected", [
    ({"instruction": "a", "input": ""}, "field 'output': missing key 'output' (the record has keys 'instruction', 'input')"),
    ({"instruction": "a", "output": 5}, "field 'output': expected a string, got int"),
    ({"instruction": None, "output": "b"}, "field 'instruction': expected a string, got null"),
    ({"instruction": "a", "input": 1, "output": "b"}, "field 'input': expected a string, got int"),
    ({"instruction": "a", "output": "b", "history": "x"}, "field 'history': expected a list of [instruction, response] pairs"),
    ({"instruction": "a", "output": "b", "history": [["q"]]}, "field 'history[0]': expected an [instruction, response] pair"),
    ({"instruction": "a", "output": "b", "history": [["q", 1]]}, "field 'history[0][1]': expected a string, got int"),
])
def test_bad_alpaca_rows(tmp_path, bad, expected):
    message = error_of(tmp_path, [ALPACA_ROWS[0], bad])
    assert message.startswith(f"{tmp_path / 'data.jsonl'}, line 2, {expected}"), message


@pytest.mark.parametrize("bad, expected", [
    ({"prompt": "a"}, "field 'completion': missing key 'completion'"),
    ({"prompt": 1, "completion": "b"}, "field 'prompt': expected a string or a list of messages, got int"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
     "field 'completion': the conversation has no assistant turn"),
    ({"prompt": [{"role": "human", "content": "a"}], "completion": "b"},
     "field 'prompt[0].role': unknown role 'human'"),
    ({"prompt": "", "completion": "", "tools": "{bad"}, "field 'tools': expected a list or a JSON string of one"),
])
def test_bad_prompt_completion_rows(tmp_path, bad, expected):
    message = error_of(tmp_path, [{"prompt": "a", "completion": "b"}, bad])
    assert message.startswith(f"{tmp_path / 'data.jsonl'}, line 2, {expected}"), message


@pytest.mark.parametrize("bad, expected", [
    ({"text": ""}, "field 'text': text is empty"),
    ({"text": 3}, "field 'text': expected a string, got int"),
])
def test_bad_text_rows(tmp_path, bad, expected):
    message = error_of(tmp_path, [{"text": "ok"}, bad])
    assert message.startswith(f"{tmp_path / 'data.jsonl'}, line 2, {expected}"), message


def test_invalid_json_line_names_the_line_and_the_json_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + '\n{"text": "unterminated\n')
    with pytest.raises(UserError) as info:
        read_conversations(path)
    assert str(info.value) == f"{path}, line 2: invalid JSON (Unterminated string starting at column 10)"


def test_badly_encoded_jsonl_line_is_one_bad_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    result = read_conversations(path, on_bad_row="skip")
    assert result.bad_rows == 1 and result.bad_row_messages[0].startswith(f"{path}, line 2: invalid JSON (not UTF-8")


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
