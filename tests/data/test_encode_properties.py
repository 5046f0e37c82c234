"""Property-based tests: over random conversations and several real-world template shapes, the trained
tokens are exactly each trained assistant turn's content plus its closing token - or the row is
dropped with a named reason. Never anything in between (spec rules 3-8).
"""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_fixtures import trained_runs
from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from instructune.testing import CHATML_TEMPLATE, make_tiny_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
INST_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + m['content'].strip() + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
GENERATION_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' }}"
    "{%- generation -%}{{ m['content'] + '<|im_end|>' }}{%- endgeneration -%}{{ '\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
REWRITING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'] if loop.last or m['role'] != 'assistant' else m['content'][:3] -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# template, its closing marker, whether it accepts system/tool turns, its BOS-adding tokenizer setting
TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", True, False),
    "llama3": (LLAMA3_TEMPLATE, "<|eot_id|>", True, True),
    "inst": (INST_TEMPLATE, "</s>", False, True),
    "generation": (GENERATION_TEMPLATE, "<|im_end|>", True, False),
    "rewriting": (REWRITING_TEMPLATE, "<|im_end|>", True, False),
}
DROP_REASONS = {"prefix_mismatch", "content_not_found", "template_error", "no_trained_tokens",
                "generation_spans_mismatch", "decode_mismatch", "empty_span"}
MARKERS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
           "<pad>", "[INST]", "[/INST]")

_TOKENIZERS = {}


def tokenizer_for(add_bos: bool):
    if add_bos not in _TOKENIZERS:
        tok = make_tiny_tokenizer(add_bos=add_bos)
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"]}, replace_extra_special_tokens=False)
        _TOKENIZERS[add_bos] = tok
    return _TOKENIZERS[add_bos]


content = st.one_of(
    st.text(alphabet=st.sampled_from(list("abcXYZ 019.,!?\n\t<>|/[]") + ["é", "ü", "中", "文", "🙂", "ß"]),
            max_size=30),
    st.text(max_size=12),  # any unicode at all
).filter(lambda text: not any(marker in text for marker in MARKERS))


@st.composite
def conversations(draw, allow_system_and_tools: bool):
    messages = []
    if allow_system_and_tools and draw(st.booleans()):
        messages.append(Message("system", draw(content)))
    for _ in range(draw(st.integers(1, 4))):
        messages.append(Message("user", draw(content)))
        if allow_system_and_tools and draw(st.integers(0, 4)) == 0:
            messages.append(Message("assistant", draw(content)))
            messages.append(Message("tool", draw(content)))
        messages.append(Message("assistant", draw(content), train=draw(st.sampled_from([None, None, None, False]))))
    return Conversation(messages)


_WS = re.compile(r"\s+")


def check(template_name: str, conv: Conversation, train_on: str) -> None:
    template, closing, _, add_bos = TEMPLATES[template_name]
    tok = tokenizer_for(add_bos)
    encoder = ConversationEncoder(tok, template, EncodingOptions(train_on=train_on))
    try:
        row = encoder.encode(conv)
    except DropRow as drop:
        assert drop.reason in DROP_REASONS
        return
    assert row.labels[0] == IGNORE_INDEX
    assistants = [m for m in conv.messages if m.role == "assistant"]
    if train_on == "last":
        assistants = assistants[-1:]
    expected = [m.content for m in assistants if m.train is not False]
    runs = trained_runs(row)
    assert len(runs) == len(expected)
    for run, text in zip(runs, expected):
        decoded = tok.decode(run, skip_special_tokens=False)
        # Whitespace aside (templates may trim; a leading-space token may straddle the header edge),
        # a run is the content and the closing marker: no header, no separator, nothing of another turn.
        assert _WS.sub("", decoded) == _WS.sub("", text) + closing
    # The ids are one tokenization of one render: BOS appears exactly once where a BOS is used.
    if add_bos:
        assert row.input_ids.count(tok.bos_token_id) == 1 and row.input_ids[0] == tok.bos_token_id


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_trained_tokens_are_exactly_the_responses_or_the_row_is_dropped(template_name, train_on):
    allow = TEMPLATES[template_name][2]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conv=conversations(allow))
    def run(conv):
        check(template_name, conv, train_on)

    run()


def test_the_rewriting_template_drops_multi_turn_rows():
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Hello there"),
                         Message("user", "Bye"), Message("assistant", "Goodbye")])
    with pytest.raises(DropRow):
        ConversationEncoder(tokenizer_for(False), REWRITING_TEMPLATE).encode(conv)
