"""Exact token and label lists for every masking rule (spec rules 1-10), with an in-process tokenizer.

Rows are shown as their tokens joined by spaces, trained tokens in [brackets]: the expected strings
below are the exact tokenization and the exact mask. `Ġ` is a space and `Ċ` a newline (byte-level BPE).
"""

import pytest

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder, DropRow
from instructune.data.options import EncodingOptions
from instructune.data.templates import BUILTIN_TEMPLATES, resolve_template
from instructune.errors import UserError
from instructune.testing import make_tiny_tokenizer


def shown(tokenizer, row) -> str:
    """Tokens separated by spaces, trained ones in brackets; also checks labels equal ids where trained."""
    parts = []
    for token_id, label, token in zip(row.input_ids, row.labels, tokenizer.convert_ids_to_tokens(row.input_ids)):
        assert label in (IGNORE_INDEX, token_id), "a trained label must equal its input id (unshifted)"
        parts.append(f"[{token}]" if label != IGNORE_INDEX else token)
    return " ".join(parts)


def encode(tokenizer, messages, template=None, **kwargs):
    encoder = ConversationEncoder(tokenizer, resolve_template(template, tokenizer), EncodingOptions(**kwargs))
    return encoder.encode(Conversation([Message(*m) if isinstance(m, tuple) else m for m in messages]))


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


OCEAN = [("user", "Which is the largest ocean?"), ("assistant", "The Pacific Ocean.")]
TWO_TURNS = [("system", "Be brief."), *OCEAN, ("user", "And France?"), ("assistant", "Paris.")]

SYSTEM = "<|im_start|> sy st em Ċ B e Ġ br i e f . <|im_end|> Ċ"
USER1 = "<|im_start|> user Ċ Wh ic h Ġis Ġthe Ġlargest Ġocean ? <|im_end|> Ċ"
HEADER = "<|im_start|> as s is tan t Ċ"
ANSWER1 = "[The] [ĠP] [ac] [ific] [Ġ] [Ocean] [.] [<|im_end|>] Ċ"
USER2 = "<|im_start|> user Ċ A n d ĠFrance ? <|im_end|> Ċ"
ANSWER2 = "[P] [ar] [is] [.] [<|im_end|>] Ċ"


def test_single_turn_trains_the_response_and_its_closing_token_only(tok):
    row = encode(tok, OCEAN)
    assert shown(tok, row) == f"{USER1} {HEADER} {ANSWER1}"
    # The ids are exactly the tokenizer's ids for the full render (rule 2).
    assert row.input_ids == tok(tok.apply_chat_template(OCEAN_DICTS, tokenize=False), add_special_tokens=False)["input_ids"]


OCEAN_DICTS = [{"role": r, "content": c} for r, c in OCEAN]


def test_multi_turn_train_on_assistant(tok):
    assert shown(tok, encode(tok, TWO_TURNS)) == f"{SYSTEM} {USER1} {HEADER} {ANSWER1} {USER2} {HEADER} {ANSWER2}"


def test_multi_turn_train_on_last(tok):
    untrained_answer1 = ANSWER1.replace("[", "").replace("]", "")
    expected = f"{SYSTEM} {USER1} {HEADER} {untrained_answer1} {USER2} {HEADER} {ANSWER2}"
    assert shown(tok, encode(tok, TWO_TURNS, train_on="last")) == expected


def test_multi_turn_train_on_all_trains_every_token_but_the_first(tok):
    row = encode(tok, TWO_TURNS, train_on="all")
    assert row.labels[0] == IGNORE_INDEX  # position 0 is never a target
    assert row.labels[1:] == row.input_ids[1:]


def test_train_on_all_never_trains_bos():
    tok = make_tiny_tokenizer(add_bos=True)
    row = encode(tok, OCEAN, train_on="all")
    assert tok.convert_ids_to_tokens(row.input_ids[:2]) == ["<s>", "<|im_start|>"]
    assert row.labels[0] == IGNORE_INDEX and row.labels[1:] == row.input_ids[1:]


def test_per_message_train_flag_overrides_the_policy(tok):
    messages = [Message("system", "Be brief."), Message("user", "Which is the largest ocean?"),
                Message("assistant", "The Pacific Ocean.", train=False), Message("user", "And France?", train=True),
                Message("assistant", "Paris.")]
    untrained_answer1 = ANSWER1.replace("[", "").replace("]", "")
    trained_user2 = "<|im_start|> user Ċ [A] [n] [d] [ĠFrance] [?] [<|im_end|>] Ċ"
    expected = f"{SYSTEM} {USER1} {HEADER} {untrained_answer1} {trained_user2} {HEADER} {ANSWER2}"
    assert shown(tok, encode(tok, messages)) == expected
    # train: false under `all` masks that turn's whole render, header included.
    row = encode(tok, messages, train_on="all")
    masked = shown(tok, row).split(f" {USER2.split()[0]}")[0]
    assert "[The]" not in masked and "[<|im_start|>] [user]" in shown(tok, row)


def test_system_prompt_is_never_trained(tok):
    row = encode(tok, [("system", "Be brief."), *OCEAN])
    assert shown(tok, row) == f"{SYSTEM} {USER1} {HEADER} {ANSWER1}"
    assert [r for r, label in zip(row.roles, row.labels) if label != IGNORE_INDEX] == [3] * 8  # assistant only


TOOL_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{%- for call in m.get('tool_calls', []) -%}{{ '<' + call['name'] + '>' }}{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def test_tool_turns_are_masked_and_tool_calls_are_trained(tok):
    messages = [Message("user", "Which ocean?"),
                Message("assistant", "", extra={"tool_calls": [{"name": "ocean"}]}),
                Message("tool", "Pacific"), Message("assistant", "The Pacific.")]
    expected = (
        "<|im_start|> user Ċ Wh ic h Ġocean ? <|im_end|> Ċ "
        f"{HEADER} [<] [o] [cean] [>] [<|im_end|>] Ċ "
        "<|im_start|> t ool Ċ P ac ific <|im_end|> Ċ "
        f"{HEADER} [The] [ĠP] [ac] [ific] [.] [<|im_end|>] Ċ"
    )
    assert shown(tok, encode(tok, messages, template=_write(TOOL_TEMPLATE))) == expected


def _write(text, name="template.jinja"):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / name
    path.write_text(text)
    return str(path)


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName the largest ocean.\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\n"
)


@pytest.mark.parametrize("user, prompt", [
    (Message("user", "Name the largest ocean.", extra={"instruction": "Name the largest ocean.", "input": ""}),
     ALPACA_NO_INPUT),
    (Message("user", "Translate to French.\n\ncat", extra={"instruction": "Translate to French.", "input": "cat"}),
     ALPACA_WITH_INPUT),
    (Message("user", "Name the largest ocean."), ALPACA_NO_INPUT),  # a plain user turn is the instruction
])
def test_alpaca_prompt_text_is_exact_and_response_ends_with_eos(tok, user, prompt):
    row = encode(tok, [user, Message("assistant", "Chat.")], template="alpaca")
    trained = [i for i, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]
    untrained = [i for i, label in zip(row.input_ids, row.labels) if label == IGNORE_INDEX]
    assert tok.decode(untrained) == prompt
    assert tok.convert_ids_to_tokens(trained)[-1] == "</s>"
    assert tok.decode(trained) == "Chat.</s>"
    assert tok.decode(row.input_ids) == prompt + "Chat.</s>"


def test_a_token_straddling_the_header_and_the_content_is_trained(tok):
    # "Assistant: " ends with a space that byte-level BPE merges into the content's first word.
    template = _write(
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'User: ' + m['content'] + '\n' }}"
        "{%- else -%}{{ 'Assistant: ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
    )
    row = encode(tok, [("user", "Hi"), ("assistant", "Pacific")], template=template)
    assert shown(tok, row) == "U ser : ĠH i Ċ A ss is tan t : [ĠP] [ac] [ific] [</s>]"


def test_bos_is_added_once_and_never_trained():
    tok = make_tiny_tokenizer(add_bos=True)
    # The tokenizer adds BOS and the template does not write one: one BOS, prepended.
    row = encode(tok, OCEAN, template="chatml")
    assert shown(tok, row) == f"<s> {USER1} {HEADER} {ANSWER1}"
    # The template writes BOS itself: still exactly one.
    template = _write("{{ bos_token }}" + BUILTIN_TEMPLATES["chatml"])
    assert shown(tok, encode(tok, OCEAN, template=template)) == f"<s> {USER1} {HEADER} {ANSWER1}"


GENERATION_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' }}"
    "{%- generation -%}{{ m['content'] }}{%- endgeneration -%}{{ '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def test_generation_blocks_give_the_spans_and_the_closing_token_is_added(tok):
    row = encode(tok, TWO_TURNS, template=_write(GENERATION_TEMPLATE))
    assert shown(tok, row) == f"{SYSTEM} {USER1} {HEADER} {ANSWER1} {USER2} {HEADER} {ANSWER2}"


REWRITING_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'] if loop.last or m['role'] != 'assistant' else '(earlier answer)' -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def test_a_template_that_rewrites_earlier_turns_drops_the_row(tok):
    with pytest.raises(DropRow) as drop:
        encode(tok, TWO_TURNS, template=_write(REWRITING_TEMPLATE))
    assert drop.value.reason in ("prefix_mismatch", "content_not_found")
    # A single turn has nothing earlier to rewrite: it encodes exactly.
    assert shown(tok, encode(tok, OCEAN, template=_write(REWRITING_TEMPLATE))) == f"{USER1} {HEADER} {ANSWER1}"


def test_a_template_that_raises_drops_the_row(tok):
    template = _write("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DropRow) as drop:
        encode(tok, OCEAN, template=template)
    assert drop.value.reason == "template_error" and "roles must alternate" in drop.value.detail


def test_keep_response_drops_the_oldest_turn_and_keeps_the_system_message(tok):
    full = encode(tok, TWO_TURNS)
    shorter = encode(tok, [TWO_TURNS[0], *TWO_TURNS[3:]])
    row = encode(tok, TWO_TURNS, max_length=len(full.input_ids) - 1)
    assert row.truncated and row.input_ids == shorter.input_ids and row.labels == shorter.labels
    assert shown(tok, row) == f"{SYSTEM} {USER2} {HEADER} {ANSWER2}"


def test_keep_response_cuts_the_end_when_one_turn_is_left(tok):
    row = encode(tok, OCEAN, max_length=24)
    assert row.truncated and len(row.input_ids) == 24
    assert shown(tok, row) == f"{USER1} {HEADER} [The] [ĠP] [ac] [ific]"


def test_keep_start_cuts_the_end(tok):
    full = encode(tok, TWO_TURNS)
    row = encode(tok, TWO_TURNS, max_length=50, truncation="keep_start")
    assert row.truncated and row.input_ids == full.input_ids[:50] and row.labels == full.labels[:50]


def test_drop_policy_drops_long_rows(tok):
    with pytest.raises(DropRow) as drop:
        encode(tok, OCEAN, max_length=20, truncation="drop")
    assert drop.value.reason == "too_long"
    assert not encode(tok, OCEAN, max_length=100, truncation="drop").truncated


def test_truncation_that_cuts_away_the_whole_response_drops_the_row(tok):
    with pytest.raises(DropRow) as drop:
        encode(tok, OCEAN, max_length=12)
    assert drop.value.reason == "no_trained_tokens"


def test_a_row_without_trained_tokens_is_dropped(tok):
    with pytest.raises(DropRow) as drop:
        encode(tok, [Message("user", "Hi"), Message("assistant", "Hello", train=False)])
    assert drop.value.reason == "no_trained_tokens"


def test_plain_text_rows_are_trained_throughout_and_end_with_eos():
    tok = make_tiny_tokenizer(add_bos=True)
    encoder = ConversationEncoder(tok, BUILTIN_TEMPLATES["plain"])
    row = encoder.encode(Conversation(text="Hello world"))
    assert shown(tok, row) == "<s> [H] [el] [lo] [Ġ] [wor] [ld] [</s>]"


def test_empty_assistant_content_still_trains_the_closing_token(tok):
    row = encode(tok, [("user", "Hi"), ("assistant", "")])
    assert shown(tok, row) == f"<|im_start|> user Ċ H i <|im_end|> Ċ {HEADER} [<|im_end|>] Ċ"


def test_no_chat_template_is_a_clear_error_listing_the_choices():
    tok = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="no chat template.*alpaca\\|chatml\\|plain"):
        resolve_template(None, tok)
    with pytest.raises(UserError, match="unknown template 'nope'"):
        resolve_template("nope", tok)


def test_chatml_markers_missing_from_the_vocabulary_are_added_as_special_tokens():
    from instructune.data.templates import add_template_tokens

    tok = make_tiny_tokenizer()
    tok_without = type(tok)(tokenizer_object=_without_chatml_tokens(), bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>")
    assert "<|im_end|>" not in tok_without.get_vocab()
    before = len(tok_without)
    assert add_template_tokens(tok_without, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert len(tok_without) == before + 2
    row = encode(tok_without, OCEAN, template="chatml")
    assert tok_without.convert_ids_to_tokens(row.input_ids).count("<|im_end|>") == 2
    assert add_template_tokens(tok_without, "chatml") == []


def _without_chatml_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["Which is the largest ocean? The Pacific Ocean."], trainer=trainer)
    return backend
