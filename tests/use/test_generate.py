"""`instructune generate`: prompts in, the same records with a `response` out, in order."""

import io
import json

import pytest

from instructune.cli import main
from instructune.testing import make_tiny_model, make_tiny_tokenizer
from instructune.use.generation import answer_conversations
from instructune.use.loading import LoadedModel
from instructune.use.prompts import read_prompts, record_conversation

RECORDS = [
    {"prompt": "Which is the largest ocean?", "id": 1},
    {"instruction": "What is the capital of France?", "id": 2},
    {"instruction": "Translate this word.", "input": "cat", "id": 3, "tags": ["x"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "this reference turn is left out"}], "id": 4},
    {"conversations": [{"from": "human", "value": "Hello world!"}], "id": 5},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=2).eval()
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_a_jsonl_file_round_trips(checkpoint, tmp_path):
    folder, model, tokenizer = checkpoint
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(source), "--model", str(folder), "--output", str(out),
                 "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "response"} for r in results] == RECORDS

    # The same greedy answers as the training engineer's batched generation, in input order.
    conversations = [record_conversation(r) for r in RECORDS]
    expected = answer_conversations(LoadedModel.wrap(model, tokenizer, tokenizer.chat_template), conversations,
                                    max_new_tokens=8, batch_size=2)
    assert [r["response"] for r in results] == expected
    assert conversations[3].messages[-1].content == "How are you?"  # the reference turn is not a prompt


def test_text_lines_from_stdin(checkpoint, monkeypatch, capsys):
    folder, _, _ = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world!\n\nWhich is the largest ocean?\n"))
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in results] == ["Hello world!", "Which is the largest ocean?"]
    assert all(isinstance(r["response"], str) for r in results)


def test_sampling_is_reproducible_with_a_seed(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    source = tmp_path / "prompts.txt"
    source.write_text("Hello world!\nHow are you?\nWhat is the capital of France?\n")
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(source), "--model", str(folder), "--output", str(out), "--temperature", "1.0",
                     "--top-p", "0.95", "--seed", "7", "--max-new-tokens", "6", "--batch-size", "2"]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 3


def test_bad_input_is_a_user_error(checkpoint, tmp_path, capsys):
    folder, _, _ = checkpoint
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    assert main(["generate", str(source), "--model", str(folder)]) == 2
    assert "prompt 2" in capsys.readouterr().err
    assert read_prompts(["", "  "], "x") == ([], False)
    source.write_text("Hello world!\n")
    assert main(["generate", str(source), "--model", str(folder), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["generate", str(source), "--model", str(folder), "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
