"""Every trained turn ends with its whole closing marker, whatever the template calls it (docs/masking.md,
rule 3): the marker is derived from renders of the same conversation, not looked up in a list.

The oracle is a table written by reading each template: the marker(s) its assistant turns close with.
Each template is tried with its markers as special tokens and an EOS that is another token (a base
model's tokenizer), and with its markers as plain text (a tokenizer that never heard of them).
"""

from __future__ import annotations

import copy
import re
from functools import cache

import pytest

from data_fixtures import trained_runs
from instructune.data.closing import closing_text, special_strings_re
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from instructune.data.templates import END_OF_TURN_MARKERS, end_of_turn_token_ids
from template_cases import _smollm2_tokenizer, conversations, load_cases, template_markers

# An EOS that is none of these templates' markers (a base model's tokenizer ends documents with it).
OTHER_EOS = "<|endoftext|>"
# What each template writes after an assistant turn's text (read from the template, not from the encoder).
CLOSING = {
    "qwen2.5": ["<|im_end|>"], "qwen3": ["<|im_end|>"], "qwq": ["<|im_end|>"], "phi-4": ["<|im_end|>"],
    "smollm2": ["<|im_end|>"], "hermes-3": ["<|im_end|>"],
    "llama-3.1": ["<|eot_id|>", "<|eom_id|>"], "llama-3.2": ["<|eot_id|>"], "firefunction-v2": ["<|eot_id|>"],
    "functionary-v3.1": ["<|eot_id|>", "<|eom_id|>"], "functionary-v3.2": ["<|eot_id|>"],
    "phi-3-mini": ["<|end|>"], "phi-3.5-mini": ["<|end|>"],
    "gemma-2": ["<end_of_turn>"], "gemma-3": ["<end_of_turn>"],
    # These write the tokenizer's EOS (`eos_token`), whatever it is: here OTHER_EOS.
    "mistral-7b-v0.3": [OTHER_EOS], "mistral-nemo": [OTHER_EOS], "mistral-small-3.2": [OTHER_EOS],
    "zephyr": [OTHER_EOS],
    "deepseek-r1-distill-qwen": ["<｜end▁of▁sentence｜>"], "deepseek-v3.1": ["<｜end▁of▁sentence｜>"],
    "gpt-oss": ["<|end|>", "<|return|>", "<|call|>"],
    "command-r": ["<|END_OF_TURN_TOKEN|>"],
    "command-r7b": ["<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "<|END_ACTION|><|END_OF_TURN_TOKEN|>"],
    "granite-3.3": ["<|end_of_text|>"],
    "nemotron-nano-v2": ["<SPECIAL_12>"],
    "exaone-3.5": ["[|endofturn|]"],
    "openchat-3.5": ["<|end_of_turn|>"],
    "seed-oss": ["<seed:eos>"],
    "end-line": ["\n### End"],
}
# The four real templates whose markers no list of known names held, and a hand-written one.
UNLISTED = ["exaone-3.5", "openchat-3.5", "seed-oss", "nemotron-nano-v2", "end-line"]

CASES = {case["family"]: case for case in load_cases()}
SIMPLE = [c for c in conversations() if c.name in ("single_turn", "single_turn_system", "multi_turn",
                                                        "multi_turn_system", "whitespace", "unicode")]
ALL = conversations()
_WS = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _WS.sub("", text)


def _ends_with_marker(tok, run: list[int], markers: list[str]) -> bool:
    """The run's text ends with one of `markers`, whole - or the marker ends inside the run's last token
    (a plain-text marker whose last piece merged with the next text: rule 5's straddling token)."""
    text = _squash(tok.decode(run, skip_special_tokens=False))
    before_last = _squash(tok.decode(run[:-1], skip_special_tokens=False))
    for marker in map(_squash, markers):
        at = text.rfind(marker)
        if text.endswith(marker) or (at >= 0 and at + len(marker) > len(before_last)):
            return True
    return False


@cache
def tokenizer(family: str, markers_special: bool):
    """SmolLM2's real tokenizer with the template's markers as special tokens (or as plain text) and an
    EOS that is not the template's closing marker."""
    case = CASES[family]
    tok = copy.deepcopy(_smollm2_tokenizer())
    if markers_special:
        markers = [m for m in template_markers(case) if m != case.get("eos_token") or m in case["special_tokens"]]
        tok.add_special_tokens({"additional_special_tokens": markers})
    tok.bos_token = case.get("bos_token")  # templates write it; as plain text when not a token
    tok.eos_token = OTHER_EOS
    return tok


def _rows(family, sample, markers_special, **options):
    case = CASES[family]
    conv = sample.conversation()
    conv.variables.update({k: v for k, v in case.get("render_kwargs", {}).items() if k != "tools"})
    encoder = ConversationEncoder(tokenizer(family, markers_special), case["template"], EncodingOptions(**options))
    return encoder, encoder.encode_all(conv)


def test_the_table_covers_every_fixture():
    assert sorted(CLOSING) == sorted(CASES)
    # The point of the issue: these closing markers are on no list of known names.
    for family in UNLISTED:
        assert not set(CLOSING[family]) & set(END_OF_TURN_MARKERS), family


@pytest.mark.parametrize("markers_special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("family", sorted(CLOSING))
def test_every_trained_turn_ends_with_its_whole_closing_marker(family, markers_special):
    tok = tokenizer(family, markers_special)
    checked = 0
    for sample in ALL:
        if not sample.renderable_by(CASES[family]) and not CASES[family].get("render_kwargs"):
            continue
        try:
            encoder, rows = _rows(family, sample, markers_special)
        except DropRow as drop:
            if drop.reason == "template_error" and not sample.renderable_by(CASES[family]):
                continue  # refused without the variables it needs even with them (see the index)
            # Markers as plain text may merge a marker with its neighbour; a special-token marker never does.
            assert not markers_special and drop.reason == "decode_mismatch", (sample.name, drop)
            continue
        for row in rows:
            runs = trained_runs(row)
            assert runs
            for run in runs:
                assert _ends_with_marker(tok, run, CLOSING[family]), (sample.name, tok.decode(run))
                checked += 1
        assert "no_closing_token" not in encoder.warnings, (sample.name, encoder.warnings)
    assert checked >= 2


@pytest.mark.parametrize("family", UNLISTED)
def test_the_marker_is_trained_whole_also_as_plain_text(family):
    """Tokens of a plain-text marker (`[`, `|`, `end`, ...) are all trained, not only the first one."""
    tok = tokenizer(family, markers_special=False)
    marker = CLOSING[family][0]
    marker_ids = tok(marker, add_special_tokens=False)["input_ids"]
    assert len(marker_ids) > 1  # really plain text here
    sample = next(s for s in SIMPLE if s.name == "single_turn")
    _, (row,) = _rows(family, sample, False)
    (run,) = trained_runs(row)
    assert tok.decode(run, skip_special_tokens=False).rstrip().endswith(marker.strip())
    # Nothing after the marker but the separator is trained: the next trained-or-not token is not a marker piece.
    positions = [i for i, label in enumerate(row.labels) if label != -100]
    assert tok.decode(row.input_ids[positions[-1] + 1:], skip_special_tokens=False).strip() == ""


@pytest.mark.parametrize("family", UNLISTED)
@pytest.mark.parametrize("markers_special", [True, False], ids=["special", "plain"])
def test_train_on_eos_acts_on_derived_markers(family, markers_special):
    tok = tokenizer(family, markers_special)
    sample = next(s for s in SIMPLE if s.name == "multi_turn")
    marker = _squash(CLOSING[family][0])
    texts, closed = {}, {}
    for policy in ("turn", "last", "none", "all"):
        _, (row,) = _rows(family, sample, markers_special, train_on_eos=policy)
        runs = trained_runs(row)
        texts[policy] = [_squash(tok.decode(run, skip_special_tokens=False)) for run in runs]
        closed[policy] = [_ends_with_marker(tok, run, CLOSING[family]) for run in runs]
    turns = sum(m["role"] == "assistant" for m in sample.messages)
    assert all(closed["turn"]) and len(closed["turn"]) == turns > 1
    assert not any(closed["none"]) and not any(marker in t for t in texts["none"])
    assert closed["last"] == [False] * (turns - 1) + [True]
    # `all` trains every turn `turn` does, and every other closing marker of the row besides.
    everything = "".join(texts["all"])
    assert all(t in everything for t in texts["turn"])
    assert everything.count(marker) >= "".join(texts["turn"]).count(marker)


def test_all_trains_the_closing_marker_of_user_turns_too():
    # OpenChat closes user turns with the same <|end_of_turn|>: `all` trains them, `turn` does not.
    tok = tokenizer("openchat-3.5", True)
    sample = next(s for s in SIMPLE if s.name == "multi_turn")
    counts = {}
    for policy in ("turn", "all"):
        _, (row,) = _rows("openchat-3.5", sample, True, train_on_eos=policy)
        counts[policy] = sum(tok.decode(run).count("<|end_of_turn|>") for run in trained_runs(row))
    user_turns = sum(m["role"] == "user" for m in sample.messages)
    assert counts["all"] == counts["turn"] + user_turns


def test_a_template_that_writes_nothing_after_a_turn_warns_and_no_other_does():
    bare = ("{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] }}{% if not loop.last %}{{ '\n' }}"
            "{% endif %}{%- endfor -%}{%- if add_generation_prompt -%}{{ '\nassistant: ' }}{%- endif -%}")
    tok = tokenizer("end-line", False)
    sample = next(s for s in SIMPLE if s.name == "multi_turn")
    encoder = ConversationEncoder(tok, bare, EncodingOptions())
    (row,) = encoder.encode_all(sample.conversation())
    assistant = sum(m["role"] == "assistant" for m in sample.messages)
    assert encoder.warnings.get("no_closing_token") == assistant
    runs = [tok.decode(run).strip() for run in trained_runs(row)]  # the space after 'assistant:' merges in
    assert runs == [m["content"].strip() for m in sample.messages if m["role"] == "assistant"]


def test_a_template_that_ends_every_render_with_eos_closes_the_last_turn_like_the_others():
    chatml_then_eos = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                       "'<|im_end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
                       "{{ '<|im_start|>assistant\n' }}{%- else -%}{{ eos_token }}{%- endif -%}")
    tok = tokenizer("qwen2.5", True)
    sample = next(s for s in SIMPLE if s.name == "multi_turn")
    encoder = ConversationEncoder(tok, chatml_then_eos, EncodingOptions())
    (row,) = encoder.encode_all(sample.conversation())
    expected = [m["content"] + "<|im_end|>" for m in sample.messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in trained_runs(row)] == expected


def test_stop_ids_include_a_derived_single_token_marker():
    for family in ("exaone-3.5", "openchat-3.5", "seed-oss"):
        tok = tokenizer(family, True)
        marker_id = tok.convert_tokens_to_ids(CLOSING[family][0])
        assert marker_id in end_of_turn_token_ids(tok, CASES[family]["template"]), family


# -- the rule itself, on strings ---------------------------------------------------------------------------

ATOMS = special_strings_re(["<|im_end|>", "<|im_start|>", "<|A|>", "<|B|>", "<|OPEN|>", "<|end|>", "<|return|>"])


def closing(following, as_last, prompt="", opening=""):
    return closing_text(following, as_last, generation_prompt=prompt, atoms=ATOMS, longest=12, openings=(opening,))


def test_the_rule_on_strings():
    assert closing("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n") == "<|im_end|>"  # separator left out
    assert closing("\n### End\n\n### Instruction:\n", "\n### End\n\n") == "\n### End"  # plain text, whole
    assert closing("<|end|><|A|>", "<|end|><|B|>") == "<|end|>"  # two headers share '<|': never split
    # A template that always appends the assistant header after the last turn.
    assert closing("<|end|><|A|>user", "<|end|><|A|>assistant", prompt="<|A|>assistant") == "<|end|>"
    # Every message opens with <|OPEN|>: it is the next message's, not this turn's closing.
    assert closing("<|end|><|OPEN|><|A|>", "<|end|><|OPEN|><|B|>", opening="<|OPEN|><|A|>") == "<|end|>"
    assert closing("\nuser: ", "") == ""  # nothing written after the turn
    assert closing("<|end|><|A|>", "<|return|>") is None  # the last turn closes otherwise: hints decide
