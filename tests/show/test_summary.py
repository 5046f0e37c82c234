"""The preparation summary that `instructune inspect` prints: tokens per role count what each role wrote."""

from __future__ import annotations

from instructune.data.conversation import Conversation, Message
from instructune.data.encoded import ROLE_NAMES
from instructune.data.prepare import prepare_dataset
from instructune.show.summary import summary_tables
from instructune.testing import make_tiny_tokenizer

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's own template: a default system turn is written when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _prepared(conversations: list[Conversation]):
    tokenizer = make_tiny_tokenizer(chat_template=SMOLLM2_TEMPLATE)
    prepared = prepare_dataset(conversations, tokenizer, template_text=SMOLLM2_TEMPLATE, num_proc=1,
                               cache_dir=False)
    assert not prepared.report.drops
    return tokenizer, prepared


def _text_of(tokenizer, row, role: str) -> str:
    ids = [i for i, code in zip(row.input_ids, row.roles) if ROLE_NAMES[code] == role]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _per_role(report) -> dict[str, int]:
    table = next(t for t in summary_tables(report) if t.title == "Tokens per role")
    return {row[0]: int(row[1].replace(",", "")) for row in table.rows}


def test_a_template_injected_system_prompt_is_template_text_not_the_users():
    tokenizer, prepared = _prepared([Conversation([Message("user", "Which is the largest ocean?"),
                                                   Message("assistant", "The Pacific Ocean.")])])
    row = prepared.rows[0]
    assert DEFAULT_SYSTEM in tokenizer.decode(row.input_ids)  # the template did write it
    # The user wrote one turn; the system turn nobody wrote is the template's own text.
    assert _text_of(tokenizer, row, "user") == "<|im_start|>user\nWhich is the largest ocean?<|im_end|>\n"
    assert DEFAULT_SYSTEM in _text_of(tokenizer, row, "other")
    per_role = _per_role(prepared.report)
    assert "system" not in per_role
    assert per_role["user"] == len(tokenizer("<|im_start|>user\nWhich is the largest ocean?<|im_end|>\n",
                                             add_special_tokens=False)["input_ids"])
    assert sum(per_role.values()) == len(row.input_ids)


def test_a_system_message_of_the_conversation_counts_as_system():
    tokenizer, prepared = _prepared([Conversation([Message("system", "Be brief."), Message("user", "Hello"),
                                                   Message("assistant", "Hi.")])])
    row = prepared.rows[0]
    assert _text_of(tokenizer, row, "system") == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert _text_of(tokenizer, row, "user") == "<|im_start|>user\nHello<|im_end|>\n"
    assert DEFAULT_SYSTEM not in tokenizer.decode(row.input_ids)
