"""Instruction labels and token weights (docs/masking.md, "Instruction weight"): exact lists, and the
identity labels + instruction labels == what `train_on: all` scores."""

import pytest

from instructune import IGNORE_INDEX
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder
from instructune.data.encoded import EncodedRow
from instructune.data.options import EncodingOptions
from instructune.data.templates import resolve_template
from instructune.data.weights import instruction_labels, token_weights
from instructune.testing import make_tiny_tokenizer

X = IGNORE_INDEX
ROW = EncodedRow(row=0, input_ids=[1, 10, 11, 12, 13, 14], labels=[X, X, X, 12, 13, X], roles=[0, 2, 2, 3, 3, 0])


def test_instruction_labels_are_the_unlabelled_positions_after_the_prefix():
    assert instruction_labels(ROW) == [X, 10, 11, X, X, 14]
    assert instruction_labels(ROW, prefix_length=2) == [X, X, 11, X, X, 14]
    assert instruction_labels(ROW, prefix_length=0) == [X, 10, 11, X, X, 14]  # position 0 never


def test_token_weights_exact():
    assert token_weights(ROW, 0.25) == [0.0, 0.25, 0.25, 1.0, 1.0, 0.25]
    assert token_weights(ROW, 0.0) == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert token_weights(ROW, 1.0, prefix_length=2) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_token_weights_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="instruction_weight"):
        token_weights(ROW, bad)


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_labels_plus_instruction_labels_equal_train_on_all(add_bos, train_on):
    tok = make_tiny_tokenizer(add_bos=add_bos)
    conv = Conversation([Message("system", "Be brief."), Message("user", "Which is the largest ocean?"),
                         Message("assistant", "The Pacific Ocean."), Message("user", "And France?"),
                         Message("assistant", "Paris.")])

    def encoded(policy):
        encoder = ConversationEncoder(tok, resolve_template(None, tok), EncodingOptions(train_on=policy))
        return encoder, encoder.encode(conv)

    encoder, masked = encoded(train_on)
    _, everything = encoded("all")
    assert masked.input_ids == everything.input_ids
    assert encoder.prefix_special_ids == ([tok.bos_token_id] if add_bos else [])
    prefix = len(encoder.prefix_special_ids)
    instruction = instruction_labels(masked, prefix)
    merged = [a if a != X else b for a, b in zip(masked.labels, instruction)]
    assert merged == everything.labels
    assert all(X in (a, b) for a, b in zip(masked.labels, instruction))  # disjoint
    # At w = 1 every position `train_on: all` scores weighs 1, every other position 0.
    assert token_weights(masked, 1.0, prefix) == [float(label != X) for label in everything.labels]
