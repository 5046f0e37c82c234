"""`instructune explain`: its numbers are the model's own, and its totals are the sums of its rows."""

import json
import math

import pytest
import torch

from instructune import IGNORE_INDEX
from instructune.cli import main
from instructune.data.batching import collate_padded
from instructune.data.conversation import Conversation, Message
from instructune.data.encode import ConversationEncoder
from instructune.testing import make_tiny_model, make_tiny_tokenizer
from instructune.train.loss import masked_lm_loss
from instructune.use.explain import (
    Explanation,
    example_conversation,
    explain_conversation,
    loss_colour,
    top_text,
)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=1).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _direct_losses(model, ids: list[int]) -> list[float]:
    """-log_softmax of the full logits at each target, the textbook way."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
    return (-log_probs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)).tolist()


def test_probabilities_and_losses_equal_a_direct_computation(tiny):
    model, tokenizer = tiny
    conv = example_conversation("Which is the largest ocean?", "The Pacific Ocean.")
    explanation = explain_conversation(model, tokenizer, tokenizer.chat_template, conv, top_k=3)

    ids = [t.id for t in explanation.tokens]
    assert [t.index for t in explanation.tokens] == list(range(len(ids)))
    assert explanation.tokens[0].prob is None and explanation.tokens[0].loss is None
    for token, expected in zip(explanation.tokens[1:], _direct_losses(model, ids), strict=True):
        assert token.loss == pytest.approx(expected, abs=1e-5)
        assert token.prob == pytest.approx(math.exp(-expected), rel=1e-5)
        assert token.loss == pytest.approx(-math.log(token.prob), abs=1e-9)

    # The ids and the trained tokens are exactly what training encodes.
    encoded = ConversationEncoder(tokenizer, tokenizer.chat_template).encode(conv)
    assert ids == encoded.input_ids
    assert [t.trained for t in explanation.tokens] == [label != IGNORE_INDEX for label in encoded.labels]

    # The masked mean is the training loss of this example.
    with torch.no_grad():
        out = masked_lm_loss(model, collate_padded([encoded], tokenizer.pad_token_id))
    assert explanation.masked_loss_mean == pytest.approx(out.loss_sum.item() / out.num_targets, abs=1e-5)


def test_totals_are_the_sums_of_the_rows(tiny):
    model, tokenizer = tiny
    conv = example_conversation("What is the capital of France?", "Paris.", system="Be brief.")
    explanation = explain_conversation(model, tokenizer, tokenizer.chat_template, conv)
    trained = [t.loss for t in explanation.tokens if t.trained]
    every = [t.loss for t in explanation.tokens[1:]]
    assert explanation.masked_loss_sum == pytest.approx(sum(trained), abs=1e-9)
    assert explanation.masked_loss_mean == pytest.approx(sum(trained) / len(trained), abs=1e-9)
    assert explanation.unmasked_loss_sum == pytest.approx(sum(every), abs=1e-9)
    assert explanation.unmasked_loss_mean == pytest.approx(sum(every) / len(every), abs=1e-9)
    assert len(every) == len(explanation.tokens) - 1
    assert explanation.unmasked_loss_sum > explanation.masked_loss_sum


def test_roles_and_top_alternatives(tiny):
    model, tokenizer = tiny
    conv = example_conversation("Which is the largest ocean?", "The Pacific Ocean.")
    explanation = explain_conversation(model, tokenizer, tokenizer.chat_template, conv, top_k=4)
    response = "".join(t.text for t in explanation.tokens if t.role == "response")
    assert response == "The Pacific Ocean.<|im_end|>"
    assert all(t.role == "response" for t in explanation.tokens if t.trained)
    assert "largest ocean" in "".join(t.text for t in explanation.tokens if t.role == "instruction")

    ids = [t.id for t in explanation.tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    for token in explanation.tokens:
        if not token.trained:
            assert token.top == []
            continue
        probs = [p for _, p in token.top]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        best = int(logits[token.index - 1].argmax())
        assert token.top[0][0] == tokenizer.decode([best])
        assert probs[0] == pytest.approx(torch.softmax(logits[token.index - 1], -1).max().item(), rel=1e-5)
        assert top_text(token).count(",") == 3


def test_role_is_the_policy_and_trained_follows_the_flags(tiny):
    model, tokenizer = tiny
    conv = Conversation(messages=[
        Message("user", "Hello"), Message("assistant", "Hi there.", train=False),
        Message("user", "How are you?"), Message("assistant", "I am fine."),
    ])
    explanation = explain_conversation(model, tokenizer, tokenizer.chat_template, conv)
    response = [t for t in explanation.tokens if t.role == "response"]
    assert "".join(t.text for t in response) == "Hi there.<|im_end|>I am fine.<|im_end|>"
    assert "".join(t.text for t in response if t.trained) == "I am fine.<|im_end|>"
    assert explanation.masked_loss_sum == pytest.approx(sum(t.loss for t in response if t.trained), abs=1e-9)


def test_an_example_training_would_drop_is_refused_with_the_reason(tiny):
    from instructune.errors import UserError

    model, tokenizer = tiny
    conv = Conversation(messages=[Message("user", "Hello"), Message("assistant", "Hi.", train=False)])
    with pytest.raises(UserError, match=r"training would drop it \(no_trained_tokens\)"):
        explain_conversation(model, tokenizer, tokenizer.chat_template, conv)


def test_the_loss_of_p_point_seven():
    assert round(-math.log(0.7), 4) == 0.3567
    explanation = Explanation([])
    assert math.isnan(explanation.masked_loss_mean)
    assert loss_colour(0) != loss_colour(3) != loss_colour(100) == loss_colour(6)


def test_small_probabilities_stay_readable_and_alternatives_keep_their_space():
    """p of a 15-nat token is 3.1e-07, not 0.0000; ` Pacific` and `Pacific` are two tokens, shown apart."""
    import io

    from rich.console import Console

    from instructune.use.explain import TokenExplanation, explanation_html, format_prob, print_explanation

    unlikely = math.exp(-15.0)
    tokens = [TokenExplanation(0, 5, "The", "response", False, None, None),
              TokenExplanation(1, 6, " Pacific", "response", True, unlikely, 15.0,
                               top=[(" Pacific", 0.5), ("Pacific", 0.25), (" Atlantic", 0.04)]),
              TokenExplanation(2, 7, " Ocean", "response", True, 0.7, -math.log(0.7))]
    explanation = Explanation(tokens)
    out = io.StringIO()
    print_explanation(Console(file=out, width=200, no_color=True), explanation)
    printed = out.getvalue()
    assert "3.1e-07" in printed and "0.0000" not in printed and "0.7000" in printed
    assert "␣Pacific 0.50, Pacific 0.25, ␣Atlantic 4.0e-02" in printed
    assert top_text(tokens[1]) == "␣Pacific 0.50, Pacific 0.25, ␣Atlantic 4.0e-02"
    page = explanation_html(explanation)
    assert "3.1e-07" in page and "0.0000" not in page
    assert json.loads(json.dumps(explanation.to_json()))["tokens"][1]["prob"] == unlikely  # full precision
    assert [format_prob(p) for p in (1.0, 0.0012, 9.9e-4, 0.0)] == ["1.0000", "0.0012", "9.9e-04", "0.0000"]


def test_cli_writes_json_and_html(checkpoint, tmp_path, capsys):
    out_json, out_html = tmp_path / "explain.json", tmp_path / "explain.html"
    code = main(["explain", "--model", str(checkpoint), "--instruction", "Which is the largest ocean?",
                 "--response", "The Pacific Ocean.", "--json", str(out_json), "--html", str(out_html)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "masked (trained tokens only)" in printed and "unmasked" in printed and "␣ocean" in printed

    data = json.loads(out_json.read_text())
    assert set(data) == {"tokens", "masked_loss_sum", "masked_loss_mean", "unmasked_loss_sum", "unmasked_loss_mean"}
    tokens = data["tokens"]
    assert all(set(t) == {"index", "id", "text", "role", "trained", "prob", "loss"} for t in tokens)
    assert tokens[0]["prob"] is None and tokens[0]["loss"] is None
    assert {t["role"] for t in tokens} == {"instruction", "response"}
    trained = [t["loss"] for t in tokens if t["trained"]]
    assert data["masked_loss_sum"] == pytest.approx(sum(trained), abs=1e-9)
    assert data["masked_loss_mean"] == pytest.approx(sum(trained) / len(trained), abs=1e-9)
    assert data["unmasked_loss_sum"] == pytest.approx(sum(t["loss"] for t in tokens[1:]), abs=1e-9)
    assert data["unmasked_loss_mean"] == pytest.approx(data["unmasked_loss_sum"] / (len(tokens) - 1), abs=1e-9)

    page = out_html.read_text()
    assert page.startswith("<!doctype html>") and "style=\"background:#" in page and "ocean" in page
    assert page.count('class="t ') == len(tokens)


def test_cli_takes_a_row_of_a_dataset(checkpoint, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Hello", "output": "Hi."}\n'
                    '{"instruction": "Which is the largest ocean?", "output": "The Pacific Ocean."}\n')
    out = tmp_path / "row.json"
    assert main(["explain", "--model", str(checkpoint), "--data", str(data), "--row", "1", "--json", str(out)]) == 0
    text = "".join(t["text"] for t in json.loads(out.read_text())["tokens"])
    assert "largest ocean" in text and "The Pacific Ocean." in text

    assert main(["explain", "--model", str(checkpoint), "--data", str(data), "--row", "5"]) == 2
    assert "past the end" in capsys.readouterr().err
    assert main(["explain", "--model", str(checkpoint), "--instruction", "Hello"]) == 2
    assert "--response" in capsys.readouterr().err
