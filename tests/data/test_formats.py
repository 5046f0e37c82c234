"""Dataset formats: every format into exact canonical conversations, detection, names, bad records."""

from __future__ import annotations

import json

import pytest

from data_fixtures import ALPACA_ROWS, A, S, T, U, alpaca_user, error_of, read_one, write_jsonl
from instructune.data.conversation import Conversation, Message, validate_conversation
from instructune.data.formats import FORMATS, PROMPT_FORMATS, detect_format, normalize_format_name
from instructune.data.readers import read_conversations
from instructune.errors import UserError
from instructune.use.prompts import record_conversation

# ---- the registry: every format is one entry of FORMATS, and everything reads it ---------------


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_every_registered_format_is_detected_named_and_converted(fmt, tmp_path):
    assert detect_format(fmt.example) == fmt.name
    assert normalize_format_name(fmt.name) == fmt.name
    assert normalize_format_name(f" {fmt.name.upper().replace('_', '-')} ") == fmt.name
    assert validate_conversation(fmt.convert(fmt.example))
    result = read_conversations(write_jsonl(tmp_path / "d.jsonl", [fmt.example]))
    assert result.format == fmt.name and len(result.conversations) == 1
    given = read_conversations(tmp_path / "d.jsonl", data_format=fmt.name)
    assert given.conversations == result.conversations
    # The messages that list the formats list this one too.
    with pytest.raises(UserError) as unknown:
        normalize_format_name("no-such-format")
    with pytest.raises(UserError) as undetectable:
        detect_format({"no_such_key": 1})
    assert fmt.name in str(unknown.value)
    assert f"{fmt.name} ({fmt.needs})" in str(undetectable.value)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_every_registered_format_is_a_prompt_for_generate_or_says_which_are(fmt):
    if not fmt.prompts:
        with pytest.raises(UserError, match="no prompt in the record") as info:
            record_conversation(fmt.example)
        assert all(f"`{other.key}`" in str(info.value) for other in PROMPT_FORMATS)
        return
    conversation = record_conversation(fmt.example)
    # The example's answer is left out: the prompt ends with the user turn to answer.
    assert conversation.messages[-1].role == U
    assert record_conversation(fmt.example, system="Be brief.").messages[0] == Message(S, "Be brief.")


def test_a_prompt_record_may_leave_the_answer_out():
    for fmt in PROMPT_FORMATS:
        if fmt.answer_field is not None:
            record = {k: v for k, v in fmt.example.items() if k != fmt.answer_field}
            assert record_conversation(record) == record_conversation(fmt.example)


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


# ---- detection and names -----------------------------------------------------------------------


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


def test_format_name_accepts_hyphens(tmp_path):
    result = read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}]),
                                data_format="prompt-completion")
    assert result.format == "prompt_completion"


def test_unknown_format_name(tmp_path):
    with pytest.raises(UserError, match="unknown data format 'vicuna'.*alpaca"):
        read_conversations(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]), data_format="vicuna")


def test_undetectable_first_record_names_its_keys_and_the_known_formats(tmp_path):
    message = error_of(tmp_path, [{"question": "a", "response": "b"}])
    assert "data.jsonl, line 1" in message
    assert "'question', 'response'" in message
    for name in ("alpaca", "prompt_completion", "messages", "sharegpt", "text"):
        assert name in message


# ---- bad records --------------------------------------------------------------------------------

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
