"""A template that transforms content trains the turn's *rendered* text exactly (docs/masking.md, rule 7):
trimmed, given a leading space, characters replaced or upper-cased - through its closing marker."""

from __future__ import annotations

import pytest

from data_fixtures import trained_runs
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from instructune.testing import make_tiny_tokenizer


def chatml_with(transform: str) -> str:
    return ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + (m['content']" + transform
            + ") + '<|im_end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
            "{%- endif -%}")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def runs(tok, template, conv, **options):
    encoder = ConversationEncoder(tok, template, EncodingOptions(**options))
    return [tok.decode(run) for row in encoder.encode_all(conv) for run in trained_runs(row)]


ONE = Conversation([Message("user", "Where is Tokyo?"), Message("assistant", "  Tokyo is in Japan. ")])
TWO = Conversation([Message("user", "Where is Tokyo?"), Message("assistant", "Tokyo is in Japan."),
                    Message("user", "And Oslo?"), Message("assistant", "Oslo is in Norway.")])


@pytest.mark.parametrize("transform, expected", [
    (" | trim", "Tokyo is in Japan.<|im_end|>"),
    (" | replace('o', '0')", "  T0ky0 is in Japan. <|im_end|>"),
    (" | upper", "  TOKYO IS IN JAPAN. <|im_end|>"),
])
def test_the_rendered_text_of_the_last_turn_is_trained(tok, transform, expected):
    assert runs(tok, chatml_with(transform), ONE) == [expected]


def test_a_leading_space_the_template_adds_is_trained_with_the_content(tok):
    template = chatml_with("").replace("'\\n' + (m['content']", "'\\n ' + (m['content']")
    (run,) = runs(tok, template, Conversation([ONE.messages[0], Message("assistant", "Tokyo is in Japan.")]))
    assert run.strip() == "Tokyo is in Japan.<|im_end|>"


def test_every_turn_transformed_alike_trains_each_as_rendered_one_row_per_turn(tok):
    # Earlier turns are not verbatim either: one row per turn, each turn the last one of its row (rule 8a).
    assert runs(tok, chatml_with(" | replace('o', '0')"), TWO) == ["T0ky0 is in Japan.<|im_end|>",
                                                                    "Osl0 is in N0rway.<|im_end|>"]
    with pytest.raises(DropRow):
        runs(tok, chatml_with(" | replace('o', '0')"), TWO, history="drop")


def test_a_template_that_drops_the_last_content_still_drops_the_row(tok):
    template = chatml_with(" if m['role'] != 'assistant' else ''")
    with pytest.raises(DropRow) as drop:
        runs(tok, template, ONE)
    assert drop.value.reason in ("content_not_found", "no_trained_tokens")


def test_an_earlier_message_holding_the_template_text_is_never_taken_for_the_turn(tok):
    tricky = Conversation([Message("user", "Quote: <|im_end|>\n<|im_start|>assistant\nnot an answer"),
                           Message("assistant", "Tokyo is in Japan.")])
    try:
        trained = runs(tok, chatml_with(" | replace('o', '0')"), tricky)
    except DropRow as drop:
        assert drop.reason == "content_not_found"
    else:
        assert trained == ["T0ky0 is in Japan.<|im_end|>"]
