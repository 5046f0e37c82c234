"""Real chat templates (tests/fixtures/chat_templates) x varied conversations (tests/template_cases.py):
no crash, no wrong span, no drop where an exact row exists, one row per turn where history is rewritten.

The oracle is independent of the encoder's method: each trained run of tokens is decoded and must be
exactly one assistant turn's generated text - its reasoning (when the row carries it), content and tool
calls - ending with a closing marker, and must hold no instruction text (system or user content).
"""

from __future__ import annotations

import re

import pytest

from data_fixtures import trained_runs
from instructune import IGNORE_INDEX
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from template_cases import case_ids, conversation_ids, conversations, load_cases, render, tokenizer_for

CASES = load_cases()
CONVERSATIONS = conversations()
_WS = re.compile(r"\s+")
_THINK = re.compile(r"<think>.*?</think>", re.S)


def _squash(text: str) -> str:
    return _WS.sub("", text)


def _variables(case) -> dict:
    # Templates that read a variable besides messages/tools (FireFunction's `functions`), as a row's extra keys.
    return {k: v for k, v in case.get("render_kwargs", {}).items() if k != "tools"}


def encode_rows(case, sample, **options):
    conv = sample.conversation()
    conv.variables.update(_variables(case))
    encoder = ConversationEncoder(tokenizer_for(case), case["template"], EncodingOptions(**options))
    return encoder, conv, encoder.encode_all(conv)


def _markers_written_by_the_model(case, sample) -> set[str]:
    """Markers the model itself writes in a turn (gpt-oss's <|channel|>, Qwen's <tool_call>), found by
    rendering the conversation up to each answer with and without it: what the answer adds after the
    prompt (or after the user turn, when the prompt is not a prefix), without its final (closing)
    marker. Any other marker inside a run means the run reaches into a header or another turn."""
    markers = [m for m in case["special_tokens"] + case["text_markers"] + [case["eos_token"]] if m]
    variables = _variables(case)
    messages = list(sample.messages)
    written_markers: set[str] = set()
    for answer in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        try:
            prompt = render(case, messages[:answer], tools=sample.tools, add_generation_prompt=True, **variables)
            whole = render(case, messages[: answer + 1], tools=sample.tools, **variables)
        except Exception:
            return set(markers)
        if whole.startswith(prompt):
            written = whole[len(prompt):]
        else:
            before = messages[answer - 1]["content"].strip()
            written = whole[whole.rfind(before) + len(before):]
        found = sorted((written.rfind(m), m) for m in markers if m in written)
        written_markers |= {m for _, m in found[:-1]}  # the last marker closes the turn: not inside a run
    return written_markers


def check_row(case, conv, row, tokenizer, sample=None) -> None:
    """Every trained run is one assistant turn's output plus a closing marker; nothing else is trained."""
    assert row.labels[0] == IGNORE_INDEX
    closing = [m for m in case["special_tokens"] + case["text_markers"] + [case["eos_token"]] if m]
    inner = _markers_written_by_the_model(case, sample) if sample is not None else set(closing)
    instructions = [_squash(m.content) for m in conv.messages if m.role in ("system", "user", "tool")
                    and m.content.strip()]
    # The tool definitions (and the system text a template builds from them) are never trained either.
    instructions += [_squash(t["function"]["description"]) for t in conv.tools or [] if "function" in t]
    assistant = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
    trained_turns = [row.turn] if row.turn is not None else assistant
    runs = trained_runs(row)
    assert len(runs) == len(trained_turns), tokenizer.decode(row.input_ids)
    for run, k in zip(runs, trained_turns):
        decoded = tokenizer.decode(run, skip_special_tokens=False)
        squashed = _squash(decoded)
        message = conv.messages[k]
        content = _squash(message.content)
        # The content is in the run, whole, or (a template that strips inline reasoning) what follows it.
        assert content in squashed or _squash(_THINK.sub("", message.content)) in squashed, (decoded, message)
        final = next((m for m in closing if squashed.endswith(_squash(m))), None)
        assert final is not None, decoded
        body = decoded[: decoded.rstrip().rfind(final)]
        stray = [m for m in closing if m in body and m not in inner]
        assert not stray, f"the run reaches into a header or another turn ({stray}): {decoded!r}"
        reasoning = message.extra.get("reasoning_content")
        # What is left once the turn's own texts are taken out must hold no instruction text.
        rest = squashed
        for own in (content, _squash(reasoning or "")):
            rest = rest.replace(own, "", 1) if own else rest
        for text in instructions:
            if len(text) >= 4 and text not in content:  # the echo case quotes the answer, not the reverse
                assert text not in rest, (decoded, text)
        if reasoning and row.turn is not None and "reasoning_content" in case["template"]:
            assert _squash(reasoning) in squashed, decoded  # a turn trained as at inference keeps its reasoning


def skip_unrenderable(case, sample) -> None:
    if not sample.renderable_by(case) and not (_variables(case) and sample.name not in case.get(
            "refuses_with_render_kwargs", {})):
        pytest.skip("the template cannot render this conversation")


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
@pytest.mark.parametrize("sample", CONVERSATIONS, ids=conversation_ids(CONVERSATIONS))
def test_real_template_masks_are_exact(case, sample):
    skip_unrenderable(case, sample)
    tokenizer = tokenizer_for(case)
    try:
        _, conv, rows = encode_rows(case, sample)
    except DropRow as drop:
        pytest.fail(f"dropped ({drop}) although every assistant content is rendered")
    for row in rows:
        check_row(case, conv, row, tokenizer, sample)


HISTORY_STRIPPING = [c for c in CASES if "reasoning_strips_history" in c["features"]
                     or "inline_think_stripped_from_history" in c["features"]]


@pytest.mark.parametrize("case", HISTORY_STRIPPING, ids=case_ids(HISTORY_STRIPPING))
@pytest.mark.parametrize("name", ["reasoning_content", "inline_think"])
def test_reasoning_on_history_stripping_templates_gives_one_row_per_turn(case, name):
    sample = next(s for s in CONVERSATIONS if s.name == name)
    feature = "reasoning_strips_history" if name == "reasoning_content" else "inline_think_stripped_from_history"
    if feature not in case["features"]:
        pytest.skip(f"{case['family']} does not strip {name} from history")
    _, conv, rows = encode_rows(case, sample)
    assert [row.turn for row in rows] == sample.assistant_indices()
    with pytest.raises(DropRow) as drop:
        encode_rows(case, sample, history="drop")
    assert drop.value.reason == "history_rewritten"


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_history_expand_trains_each_turn_once(case):
    sample = next(s for s in CONVERSATIONS if s.name == "multi_turn")
    skip_unrenderable(case, sample)
    _, conv, rows = encode_rows(case, sample, history="expand")
    assert [row.turn for row in rows] == sample.assistant_indices()
    for row in rows:
        check_row(case, conv, row, tokenizer_for(case), sample)


REFUSES_SYSTEM = [c for c in CASES if "refuses_system" in c["features"]]


@pytest.mark.parametrize("case", REFUSES_SYSTEM, ids=case_ids(REFUSES_SYSTEM))
def test_a_template_that_refuses_the_system_role_says_how_to_fix_it(case):
    sample = next(s for s in CONVERSATIONS if s.name == "multi_turn_system")
    with pytest.raises(DropRow) as drop:
        encode_rows(case, sample)
    assert drop.value.reason == "template_error" and "system_role: merge" in drop.value.detail
    for policy in ("merge", "drop"):
        encoder, conv, rows = encode_rows(case, sample, system_role=policy)
        check_row(case, encoder._apply_system_policy(conv), rows[0], tokenizer_for(case), sample)


# Every template that renders a plain user/assistant conversation without extra variables (two need tools
# or functions passed in: their fixed conversations above cover them).
PROPERTY_FAMILIES = tuple(c["family"] for c in CASES if not c.get("render_kwargs"))


@pytest.mark.parametrize("family", PROPERTY_FAMILIES)
def test_random_conversations_on_real_templates(family):
    """Random multi-turn conversations (clean words, or any text): kept rows pass the oracle, and rows
    of clean words - which every template writes verbatim - are never dropped."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from instructune.data.conversation import Conversation, Message

    case = next(c for c in CASES if c["family"] == family)
    tokenizer = tokenizer_for(case)
    markers = [m for m in case["special_tokens"] + case["text_markers"] + [case["eos_token"]] if m]
    clean = st.text(alphabet=st.sampled_from(list("abc XYZ019.,!?é中🙂")), min_size=1, max_size=20).map(
        lambda text: ("clean", text.strip() or "x"))
    anything = st.text(max_size=20).filter(lambda text: not any(m in text for m in markers) and "<" not in text
                                            ).map(lambda text: ("any", text))

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(texts=st.lists(st.one_of(clean, anything), min_size=2, max_size=6), reasoning=st.booleans())
    def run(texts, reasoning):
        all_clean = all(kind == "clean" for kind, _ in texts)
        texts = [text for _, text in texts]
        messages = []
        for i in range(0, len(texts) - 1, 2):
            extra = {"reasoning_content": "thinking " + texts[i]} if reasoning else {}
            messages += [Message("user", texts[i]), Message("assistant", texts[i + 1], extra=extra)]
        conv = Conversation(messages)
        encoder = ConversationEncoder(tokenizer, case["template"], EncodingOptions())
        try:
            rows = encoder.encode_all(conv)
        except DropRow as drop:
            assert not all_clean, f"dropped ({drop}) a row of clean text"
            return
        for row in rows:
            check_row(case, conv, row, tokenizer)

    run()
