"""The encoder's shortcuts change no row: the Rust tokenizer called directly equals the `transformers`
call, a placeholder render reused across conversations of one shape equals a fresh one, and the cache
key reads every field of a conversation."""

from __future__ import annotations

import dataclasses

import pytest

from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from instructune.data.prepare import KEY_CONVERSATION_FIELDS, KEY_MESSAGE_FIELDS, CacheKey
from instructune.data.templates import resolve_template
from instructune.testing import make_tiny_tokenizer
from template_cases import case_ids, conversations, load_cases, tokenizer_for

TEXTS = [
    "<|im_start|>user\nWhich is the largest ocean?<|im_end|>\n<|im_start|>assistant\nThe Pacific.<|im_end|>\n",
    "  leading spaces, tabs\tand\r\nnewlines\n\n",
    "unicode: café, naïve, 東京, emoji 🙂, combining é",
    "",
]


def _wrapper(tokenizer, text):
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_the_direct_backend_gives_the_wrappers_ids_and_offsets(which, smollm2_tokenizer):
    tokenizer = make_tiny_tokenizer() if which == "tiny" else smollm2_tokenizer
    encoder = ConversationEncoder(tokenizer, resolve_template("chatml", tokenizer))
    assert encoder._direct_backend() is not None  # the shortcut is really taken for fast tokenizers
    for text in TEXTS:
        ids, offsets = encoder.tokenize(text)
        assert (list(ids), [tuple(o) for o in offsets]) == _wrapper(tokenizer, text)


def test_the_direct_backend_is_not_used_when_the_wrapper_would_change_the_call():
    tokenizer = make_tiny_tokenizer()
    encoder = ConversationEncoder(tokenizer, resolve_template("chatml", tokenizer))
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=3)  # left over from another caller: transformers would undo it
    try:
        assert encoder._direct_backend() is None
        assert encoder.tokenize(TEXTS[0])[0] == _wrapper(tokenizer, TEXTS[0])[0]
        assert len(encoder.tokenize(TEXTS[0])[0]) > 3
    finally:
        backend.no_truncation()
    tokenizer.split_special_tokens = True  # the wrapper would split "<|im_start|>" into pieces
    try:
        assert encoder._direct_backend() is None
        assert encoder.tokenize(TEXTS[0])[0] == _wrapper(tokenizer, TEXTS[0])[0]
    finally:
        tokenizer.split_special_tokens = False
    _wrapper(tokenizer, "a")  # the wrapper sets the backend back for its next call
    assert encoder._direct_backend() is not None


def _encode_or_drop(encoder, conv):
    try:
        return encoder.encode_all(conv)
    except DropRow as drop:
        return drop.reason


@pytest.mark.parametrize("case", load_cases(), ids=case_ids())
def test_a_reused_placeholder_render_gives_the_rows_a_fresh_encoder_gives(case):
    """One encoder over every sample conversation (twice, so each shape is met again) against a new
    encoder per conversation, for every real template: the same rows and the same drops."""
    tokenizer = tokenizer_for(case)
    variables = {k: v for k, v in case.get("render_kwargs", {}).items() if k != "tools"}
    samples = []
    for sample in conversations():
        conv = sample.conversation()
        conv.variables.update(variables)
        samples.append(conv)
    shared = ConversationEncoder(tokenizer, case["template"], EncodingOptions())
    for conv in samples + samples:
        fresh = ConversationEncoder(tokenizer, case["template"], EncodingOptions())
        assert _encode_or_drop(shared, conv) == _encode_or_drop(fresh, conv)
    assert shared._placeholder_renders  # the reuse was exercised


def test_conversations_of_one_shape_share_one_placeholder_render():
    tokenizer = make_tiny_tokenizer()
    encoder = ConversationEncoder(tokenizer, resolve_template("chatml", tokenizer))
    for question, answer in [("Largest ocean?", "Pacific."), ("Capital of France?", "Paris."), ("2+2?", "4")]:
        encoder.encode(Conversation([Message("user", question), Message("assistant", answer)]))
    assert len(encoder._placeholder_renders) == 1
    encoder.encode(Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")]))
    assert len(encoder._placeholder_renders) == 2


def test_a_stale_placeholder_render_is_refused_not_trusted():
    """A template whose text depends on something besides the messages (here a counter standing in for the
    date) renders the placeholders differently on the second row: the exact alignment fails and the
    fields are searched instead, so the row is still exactly right."""
    tokenizer = make_tiny_tokenizer()
    template = resolve_template("chatml", tokenizer)
    encoder = ConversationEncoder(tokenizer, template)
    first = Conversation([Message("user", "Largest ocean?"), Message("assistant", "Pacific.")])
    second = Conversation([Message("user", "Capital of France?"), Message("assistant", "Paris.")])
    expected = ConversationEncoder(tokenizer, template).encode(second)
    encoder.encode(first)
    key = next(iter(encoder._placeholder_renders))
    encoder._placeholder_renders[key] = "stale text " + encoder._placeholder_renders[key]
    assert encoder.encode(second) == expected


def test_the_cache_key_reads_every_field_of_a_conversation():
    assert {f.name for f in dataclasses.fields(Conversation)} == set(KEY_CONVERSATION_FIELDS)
    assert {f.name for f in dataclasses.fields(Message)} == set(KEY_MESSAGE_FIELDS)
    tokenizer = make_tiny_tokenizer()
    template = resolve_template("chatml", tokenizer)

    def key(conv):
        cache_key = CacheKey(tokenizer, template, EncodingOptions())
        cache_key.add(0, conv)
        return cache_key.hexdigest()

    base = Conversation([Message("user", "Q"), Message("assistant", "A")])
    variants = [
        Conversation([Message("user", "Q"), Message("assistant", "B")]),
        Conversation([Message("user", "Q"), Message("assistant", "A", train=False)]),
        Conversation([Message("user", "Q"), Message("assistant", "A", extra={"name": "x"})]),
        Conversation([Message("system", "Q"), Message("assistant", "A")]),
        Conversation(base.messages, tools=[{"type": "function", "function": {"name": "f"}}]),
        Conversation(base.messages, variables={"date": "today"}),
        Conversation(text="Q A"),
    ]
    keys = {key(base)} | {key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert key(Conversation([Message("user", "Q"), Message("assistant", "A")])) == key(base)
