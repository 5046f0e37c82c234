"""Templates that are not prefix-stable, history expansion, reasoning, tool calls, and the new policies
(`history`, `reasoning`, `train_on_eos`, `system_role`, `template_vars`) on small hand-written templates."""

import pytest

from data_fixtures import trained_runs
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.encoded import PreparationReport
from instructune.data.options import EncodingOptions
from instructune.data.prepare import encode_conversations
from instructune.testing import CHATML_TEMPLATE, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def trained_texts(tok, row) -> list[str]:
    """The decoded runs of trained tokens."""
    return [tok.decode(run, skip_special_tokens=False) for run in trained_runs(row)]


def rows(tok, template, messages, **options):
    encoder = ConversationEncoder(tok, template, EncodingOptions(**options))
    conv = messages if isinstance(messages, Conversation) else Conversation(messages)
    return encoder, encoder.encode_all(conv)


TWO = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye"), Message("assistant", "Ciao")]

# Ends every render with EOS (as Phi-3.5 does): no render of fewer messages is a prefix of the full one.
EOS_AT_END = CHATML_TEMPLATE + "{%- if not add_generation_prompt -%}{{ eos_token }}{%- endif -%}"
# Writes an empty think block into the last assistant turn only (as Qwen3 does).
THINK_LAST = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['role'] == 'assistant' and loop.last -%}{{ '<think>\n' + m.get('reasoning_content', '') + '\n</think>\n' }}"
    "{%- endif -%}{{ m['content'] + '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def test_a_template_that_ends_every_render_with_eos_keeps_every_turn(tok):
    _, (row,) = rows(tok, EOS_AT_END, TWO)
    assert trained_texts(tok, row) == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    assert tok.decode(row.input_ids).endswith("</s>")  # the final EOS is template text, not trained


def test_a_think_block_in_the_last_turn_is_what_the_model_writes_and_is_trained(tok):
    _, (row,) = rows(tok, THINK_LAST, TWO)
    assert trained_texts(tok, row) == ["Hello<|im_end|>", "<think>\n\n</think>\nCiao<|im_end|>"]


def test_reasoning_stripped_from_history_gives_one_row_per_turn(tok):
    messages = [Message("user", "Hi"), Message("assistant", "Hello", extra={"reasoning_content": "greet"}),
                Message("user", "Bye"), Message("assistant", "Ciao", extra={"reasoning_content": "leave"})]
    encoder, expanded = rows(tok, THINK_LAST, messages)
    assert [row.turn for row in expanded] == [1, 3]
    assert [trained_texts(tok, row) for row in expanded] == [["<think>\ngreet\n</think>\nHello<|im_end|>"],
                                                             ["<think>\nleave\n</think>\nCiao<|im_end|>"]]
    with pytest.raises(DropRow) as drop:
        rows(tok, THINK_LAST, messages, history="drop")
    assert drop.value.reason == "history_rewritten"
    with pytest.raises(DropRow):  # the single-row entry point cannot expand
        encoder.encode(Conversation(messages))
    # Reasoning as context only: the stripped history loses nothing trained, so one row does.
    _, (masked,) = rows(tok, THINK_LAST, messages, reasoning="mask")
    assert trained_texts(tok, masked) == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    # The per-message flag wins over the policy.
    messages[1].train = True
    _, (flagged, _) = rows(tok, THINK_LAST, messages, reasoning="mask")
    assert trained_texts(tok, flagged) == ["<think>\ngreet\n</think>\nHello<|im_end|>"]


def test_history_expand_and_the_report(tok):
    encoder = ConversationEncoder(tok, CHATML_TEMPLATE, EncodingOptions(history="expand"))
    kept, report = encode_conversations(encoder, [(0, Conversation(TWO)), (1, Conversation(TWO[:2]))])
    assert [(row.row, row.turn) for row in kept] == [(0, 1), (0, 3), (1, None)]
    assert (report.rows_kept, report.expanded, report.expanded_rows) == (3, 1, 2)
    assert report.expanded_tokens == len(kept[0].input_ids) + len(kept[1].input_ids)
    assert report.expanded_trained == kept[0].num_trained + kept[1].num_trained


TOOLS = (
    "{%- if tools -%}{{ 'Tools: ' + tools | map(attribute='name') | join(',') + '\n' }}{%- endif -%}"
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['content'] -%}{{ m['content'] }}{%- endif -%}"
    "{%- for c in m.get('tool_calls', []) -%}{{ '<call>' + c['function']['name'] + '</call>' }}{%- endfor -%}"
    "{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def test_tool_calls_are_trained_and_tool_results_and_definitions_never(tok):
    call = {"function": {"name": "weather", "arguments": "{}"}}
    conv = Conversation([Message("user", "Weather?"), Message("assistant", "", extra={"tool_calls": [call]}),
                         Message("tool", "sunny"), Message("assistant", "It is sunny.")],
                        tools=[{"name": "weather"}])
    _, (row,) = rows(tok, TOOLS, conv)
    assert trained_texts(tok, row) == ["<call>weather</call><|im_end|>", "It is sunny.<|im_end|>"]


@pytest.mark.parametrize("policy, expected", [
    ("turn", ["Hello<|im_end|>", "Ciao<|im_end|>"]),
    ("last", ["Hello", "Ciao<|im_end|>"]),
    ("none", ["Hello", "Ciao"]),
    ("all", ["Hi<|im_end|>", "Hello<|im_end|>", "Bye<|im_end|>", "Ciao<|im_end|>"]),
])
def test_train_on_eos(tok, policy, expected):
    _, (row,) = rows(tok, CHATML_TEMPLATE, TWO, train_on_eos=policy)
    texts = trained_texts(tok, row)
    if policy == "all":  # the user turns' closing tokens are trained alone
        assert "".join(texts).replace("Hello", "").replace("Ciao", "") == "<|im_end|>" * 4
    else:
        assert texts == expected


NO_SYSTEM = (
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ raise_exception('System role not supported') }}"
    "{%- endif -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor -%}"
)


def test_a_template_that_refuses_the_system_role_explains_the_fix(tok):
    conv = Conversation([Message("system", "Be brief."), *TWO[:2]])
    encoder = ConversationEncoder(tok, NO_SYSTEM)
    with pytest.raises(DropRow) as drop:
        encoder.encode_all(conv)
    assert drop.value.reason == "template_error" and "system_role: merge" in drop.value.detail
    assert "system_role: merge" in encoder.notes["system_not_supported"]
    _, (merged,) = rows(tok, NO_SYSTEM, conv, system_role="merge")
    assert "Be brief.\n\nHi" in tok.decode(merged.input_ids)
    _, (dropped,) = rows(tok, NO_SYSTEM, conv, system_role="drop")
    assert "Be brief." not in tok.decode(dropped.input_ids)


def test_template_vars_and_row_variables_reach_the_template(tok):
    template = "{{ greeting }}" + CHATML_TEMPLATE
    conv = Conversation(TWO[:2], variables={"greeting": "Hey "})
    _, (row,) = rows(tok, template, conv)
    assert tok.decode(row.input_ids).startswith("Hey ")
    _, (row,) = rows(tok, template, Conversation(TWO[:2]), template_vars={"greeting": "Yo "})
    assert tok.decode(row.input_ids).startswith("Yo ")


def test_markers_not_in_the_vocabulary_are_noted(tok):
    encoder = ConversationEncoder(tok, CHATML_TEMPLATE.replace("<|im_end|>", "<|eot_id|>"))
    assert "<|eot_id|>" in encoder.marker_note
    assert not ConversationEncoder(tok, CHATML_TEMPLATE).marker_note


def test_report_merges_the_new_counts():
    a, b = PreparationReport(expanded=1, expanded_rows=2, notes={"x": "y"}), PreparationReport(expanded=2)
    a.merge(b)
    assert (a.expanded, a.expanded_rows, a.notes) == (3, 2, {"x": "y"})


def test_inspect_shows_expanded_rows_and_notes(tok):
    from instructune.show.summary import summary_tables
    from instructune.show.tokens import row_view

    encoder = ConversationEncoder(tok, CHATML_TEMPLATE, EncodingOptions(history="expand"))
    kept, report = encode_conversations(encoder, [(0, Conversation(TWO))])
    report.notes["system_not_supported"] = "set system: merge"
    tables = {table.title: table for table in summary_tables(report)}
    expansion = dict(tables["History rewritten: one row per turn"].rows)
    assert expansion["conversations expanded"] == "1" and expansion["rows made from them"] == "2"
    assert tables["Notes"].rows == [("system_not_supported", "set system: merge")]
    assert "turn 3: history as at inference" in row_view(kept[1], tok).header()


def test_reasoning_a_template_never_reads_is_not_a_rewritten_history(tok):
    messages = [Message("user", "Hi"), Message("assistant", "Hello", extra={"reasoning_content": "greet"}),
                Message("user", "Bye"), Message("assistant", "Ciao", extra={"reasoning_content": "leave"})]
    encoder, (row,) = rows(tok, CHATML_TEMPLATE, messages)  # ChatML reads no reasoning key: one row
    assert trained_texts(tok, row) == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    assert encoder.warnings == {"reasoning_not_rendered": 2}


def test_inline_think_is_trained_or_masked(tok):
    messages = [Message("user", "Hi"), Message("assistant", "<think>greet</think>Hello")]
    _, (row,) = rows(tok, CHATML_TEMPLATE, messages)
    assert trained_texts(tok, row) == ["<think>greet</think>Hello<|im_end|>"]
    _, (row,) = rows(tok, CHATML_TEMPLATE, messages, reasoning="mask")
    assert trained_texts(tok, row) == ["Hello<|im_end|>"]
