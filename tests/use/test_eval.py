"""`instructune eval`: exact metrics on a set a tiny model has memorised, and the loss the trainer would compute."""

import json
import math

import pytest
import torch

from instructune.cli import main
from instructune.data.batching import collate_padded
from instructune.data.encode import ConversationEncoder
from instructune.data.readers import read_conversations
from instructune.testing import make_tiny_model, make_tiny_tokenizer, memorise
from instructune.train.loss import masked_lm_loss
from instructune.use.text_metrics import contains_answer, exact_match, normalize_answer, rouge_l

ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France.", "answer": "Paris"},
    {"instruction": "Which is the largest ocean?", "output": "The Pacific Ocean is the largest ocean."},
    {"instruction": "How are you?", "output": "I am fine, thank you.", "answer": "fine"},
    {"instruction": "What is 2 + 3?", "input": "Answer with digits.", "output": "2 + 3 = 5"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _memorise(model, tokenizer, data) -> None:
    memorise(model, tokenizer, [conv for _, conv in read_conversations(data).conversations])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    data = _write_jsonl(folder / "toy.jsonl", ROWS)
    tokenizer = make_tiny_tokenizer()
    memorised = make_tiny_model(len(tokenizer), hidden_size=64)
    _memorise(memorised, tokenizer, data)
    memorised.save_pretrained(folder / "memorised")
    tokenizer.save_pretrained(folder / "memorised")
    untrained = make_tiny_model(len(tokenizer), seed=3)
    untrained.save_pretrained(folder / "untrained")
    tokenizer.save_pretrained(folder / "untrained")
    return folder, data, tokenizer, untrained


def test_normalisation_and_text_metrics():
    assert normalize_answer("  The   Pacific\nOcean. ") == "the pacific ocean"
    assert normalize_answer("Really?!...") == "really"
    assert exact_match("the pacific ocean", "The Pacific Ocean.")
    assert not exact_match("The Pacific.", "The Pacific Ocean.")
    assert contains_answer("It is Paris, of course.", "The capital of France is Paris.", answer="Paris")
    assert not contains_answer("It is Lyon.", "The capital of France is Paris.", answer="Paris")
    # Without a key the whole (normalised) reference must be in the prediction.
    assert contains_answer("Well: the capital of France is Paris, I think.", "The capital of France is Paris.")
    assert not contains_answer("Paris.", "The capital of France is Paris.")
    assert rouge_l("The capital of France is Paris.", "the capital of france is paris") == 1.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 words; P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS 2 words ("the cat"): P = 2/3, R = 2/6, F1 = 2PR / (P + R) = 4/9.
    assert rouge_l("mat the cat", "the cat is on the mat") == pytest.approx(4 / 9)
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_metrics_are_exact_on_a_memorised_set(toy, tmp_path, capsys):
    folder, data, _, _ = toy
    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(folder / "memorised"), "--output", str(out),
                 "--max-new-tokens", "24", "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "ROUGE-L" in printed

    totals = json.loads((out / "totals.json").read_text())
    assert totals["rows"] == totals["rows_scored"] == totals["generated"] == 4
    assert totals["exact_match"] == 1.0 and totals["contains"] == 1.0 and totals["rouge_l"] == 1.0
    assert totals["token_accuracy"] == 1.0
    assert totals["loss"] < 0.01
    assert totals["perplexity"] == pytest.approx(math.exp(totals["loss"]))

    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["prediction"] for r in rows] == [r["output"] for r in ROWS]
    assert [r["reference"] for r in rows] == [r["output"] for r in ROWS]
    assert [r["answer"] for r in rows] == ["Paris", None, "fine", None]
    assert all(r["correct"] == r["tokens"] > 0 for r in rows)


def test_loss_and_accuracy_equal_the_training_loss(toy, tmp_path):
    folder, data, tokenizer, untrained = toy
    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(folder / "untrained"), "--output", str(out),
                 "--no-generate", "--batch-size", "3"]) == 0
    totals = json.loads((out / "totals.json").read_text())
    encoder = ConversationEncoder(tokenizer, tokenizer.chat_template)
    batch = collate_padded([encoder.encode(c) for _, c in read_conversations(data).conversations],
                           tokenizer.pad_token_id)
    with torch.no_grad():
        expected = masked_lm_loss(untrained, batch, compute_accuracy=True)
        logits = untrained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert totals["tokens"] == expected.num_targets
    assert totals["loss"] == pytest.approx(expected.loss_sum.item() / expected.num_targets, abs=1e-5)
    assert totals["token_accuracy"] == expected.num_correct.item() / expected.num_targets
    assert totals["generated"] == 0 and totals["exact_match"] is None

    # Per-row losses: each row's own mean over its response tokens.
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    targets = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    for i, row in enumerate(rows):
        scored = targets[i] != -100
        row_losses = -log_probs[i][scored].gather(1, targets[i][scored][:, None])
        assert row["tokens"] == int(scored.sum())
        assert row["loss"] == pytest.approx(row_losses.mean().item(), abs=1e-5)
        assert row["prediction"] is None


def test_limit_and_an_adapter(toy, tmp_path):
    from peft import LoraConfig, get_peft_model

    from instructune.model.load import load_model

    folder, data, _, _ = toy
    base = load_model(str(folder / "memorised"))
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")  # LoRA B starts at zero: the adapter changes nothing yet

    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(tmp_path / "adapter"), "--output", str(out), "--limit", "2",
                 "--max-new-tokens", "24"]) == 0
    totals = json.loads((out / "totals.json").read_text())
    assert totals["generated"] == 2 and totals["exact_match"] == 1.0 and totals["token_accuracy"] == 1.0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    # --limit limits the rows, in the loss pass too: the first two rows only.
    assert [r["row"] for r in rows] == [0, 1] and all(r["prediction"] is not None for r in rows)
    assert totals["rows"] == totals["rows_scored"] == 2


def test_limit_limits_the_loss_pass_and_every_pass_shows_progress(toy, tmp_path, capsys):
    folder, data, _, _ = toy
    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(folder / "memorised"), "--output", str(out), "--limit", "3",
                 "--no-generate"]) == 0
    totals = json.loads((out / "totals.json").read_text())
    assert totals["rows"] == totals["rows_scored"] == 3 and totals["generated"] == 0
    # Both passes report progress even where a bar cannot show (stderr is not a terminal here).
    err = capsys.readouterr().err
    assert "scoring responses: 0/3 (started)" in err and "scoring responses: 3/3 (" in err and ", done)" in err
    assert main(["eval", str(data), "--model", str(folder / "memorised"), "--limit", "1",
                 "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "scoring responses: 1/1" in err and "generating: 0/1 (started)" in err and "generating: 1/1" in err


def test_bad_arguments_are_user_errors(toy, capsys):
    folder, data, _, _ = toy
    assert main(["eval", str(data), "--model", str(folder / "untrained"), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_max_length_out_of_range_is_a_one_line_error_before_loading(tmp_path, capsys):
    # The model does not exist: the flag is checked first, so its absence never comes up.
    status = main(["eval", str(tmp_path / "data.jsonl"), "--model", str(tmp_path / "missing"), "--max-length", "0"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == "error: --max-length must be at least 2 (or null), got 0\n"


def test_drops_are_counted_as_training_counts_them_with_a_result_per_row(toy, tmp_path):
    from instructune.data.options import EncodingOptions
    from instructune.data.prepare import prepare_dataset

    folder, _, tokenizer, _ = toy
    data = _write_jsonl(tmp_path / "mixed.jsonl", ROWS[:2] + [{"instruction": 7, "output": "bad"}] + ROWS[2:])
    out = tmp_path / "eval"
    assert main(["eval", str(data), "--model", str(folder / "untrained"), "--output", str(out), "--no-generate",
                 "--on-bad-row", "skip", "--max-length", "40", "--truncation", "drop"]) == 0
    training = prepare_dataset(str(data), tokenizer, EncodingOptions(on_bad_row="skip", max_length=40,
                                                                     truncation="drop"), cache_dir=False).report
    totals = json.loads((out / "totals.json").read_text())
    assert totals["rows"] == training.rows_read == 5
    assert totals["rows_dropped"] == training.dropped == {"bad_row": 1, "too_long": 1}
    assert totals["rows_scored"] == training.rows_kept
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2, 3, 4]
    assert [(r["row"], r["dropped"]) for r in rows if r["dropped"]] == training.drops
    assert all((r["loss"] is None) == bool(r["dropped"]) for r in rows)


def test_a_broken_template_fails_before_the_model_is_loaded(tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    # The model folder does not exist: the template is what the error must be about.
    assert main(["eval", str(tmp_path / "d.jsonl"), "--model", str(tmp_path / "missing") + "/",
                 "--template", str(template)]) == 2
    assert capsys.readouterr().err == (f"error: template file {template}, line 2, column 17: Jinja syntax error: "
                                       "unexpected '}'\n")
