"""`instructune prepare`: the rows training trains on, written as a dataset folder other trainers load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from instructune.cli import main
from train_fixtures import write_tiny_model

RECORDS = [
    {"messages": [{"role": "user", "content": "Which is the largest ocean?"},
                  {"role": "assistant", "content": "The Pacific Ocean."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Sure?"},
                  {"role": "assistant", "content": "Yes, Paris is the capital of France."}]},
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I am fine, thank you."}]},
    {"messages": [{"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "Hello world! " * 30}]},  # longer than --max-length: cut
]


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    model = write_tiny_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return model, data


def _records(rows) -> list[dict]:
    return [{"row": int(r["row"]), "input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]


def test_prepare_writes_the_rows_of_inspect_and_of_training(tmp_path, setup, capsys):
    import datasets

    from instructune import encode
    from instructune.show.prepared_folder import report_json
    from instructune.train.config import load_config
    from instructune.train.setup import setup_run
    from train_fixtures import quick_settings

    model, data = setup
    flags = ["--tokenizer", str(model), "--max-length", "48", "--train-on", "assistant"]
    assert main(["prepare", str(data), "--output", str(tmp_path / "hf"), *flags]) == 0
    printed = capsys.readouterr().out
    assert "Summary" in printed and f"wrote 4 row(s) to {tmp_path / 'hf'}" in printed
    assert main(["inspect", str(data), "--jsonl", str(tmp_path / "rows.jsonl"), "--limit", "0", *flags]) == 0
    inspected = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]

    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.column_names == ["input_ids", "labels", "attention_mask", "row"]
    assert _records(loaded) == inspected
    assert [list(r["attention_mask"]) for r in loaded] == [[1] * len(r["input_ids"]) for r in loaded]
    assert all(label in (-100, token) for r in inspected for token, label in zip(r["input_ids"], r["labels"]))

    config = load_config(overrides=quick_settings(model, data, tmp_path / "run", max_length=48, eval_fraction=0))
    run = setup_run(config, name="prepare", console=Console(quiet=True))
    assert [{"row": r.row, "input_ids": list(r.input_ids), "labels": list(r.labels)} for r in run.train_rows] \
        == inspected

    summary = json.loads((tmp_path / "hf" / "preparation.json").read_text())
    assert summary["report"] == report_json(encode(str(data), str(model), max_length=48, cache=False).report)
    assert summary["report"]["rows_read"] == 4 and summary["report"]["rows_kept"] == 4
    assert summary["report"]["truncated"] == 2  # the long answer, and the two-turn conversation
    assert summary["report"]["tokens_trained"] == sum(label != -100 for r in inspected for label in r["labels"])
    assert summary["encoding"]["max_length"] == 48 and summary["source"] == str(data)
    assert summary["template_text"] == run.template

    # The other writers hold the very same rows.
    for fmt, name in (("parquet", "data.parquet"), ("jsonl", "data.jsonl")):
        assert main(["prepare", str(data), "--output", str(tmp_path / fmt), "--output-format", fmt, *flags]) == 0
        other = datasets.load_dataset(fmt if fmt == "parquet" else "json",
                                      data_files=str(tmp_path / fmt / name), split="train",
                                      cache_dir=str(tmp_path / "datasets-cache"))
        assert _records(other) == inspected
        assert sorted(os.listdir(tmp_path / fmt)) == sorted([name, "preparation.json"])


def test_a_bad_row_gives_the_error_inspect_gives(tmp_path, setup, capsys):
    model, data = setup
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert main(["inspect", str(data), "--tokenizer", str(model)]) == 2
    inspect_error = capsys.readouterr().err
    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(tmp_path / "out")]) == 2
    prepare_error = capsys.readouterr().err
    assert prepare_error == inspect_error
    assert prepare_error.startswith(f"error: {data}, line 2, field 'messages[0]") and prepare_error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_that_holds_something_is_not_overwritten_unless_asked(tmp_path, setup, capsys):
    import datasets

    model, data = setup
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out), "--train-on", "all"]) == 2
    assert capsys.readouterr().err == (f"error: {out} already exists and is not empty; give a new folder, or add "
                                       "--overwrite (overwrite=True) to replace it\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out), "--train-on", "all",
                 "--overwrite"]) == 0
    rows = datasets.load_from_disk(str(out))
    assert all(label != -100 for label in rows[0]["labels"][1:])  # train_on all: every token but the first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_a_write_that_fails_half_way_leaves_the_old_folder_and_no_leftovers(tmp_path, setup, monkeypatch, capsys):
    import instructune.show.prepared_folder as prepared_folder

    model, data = setup
    out = tmp_path / "out"
    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(rows, *sources):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepared_folder, "arrow_batches", failing)
    assert main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: no space left on the device to write {out}: ") and error.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.jsonl", "model", "out"]


def test_nothing_kept_writes_nothing(tmp_path, setup, capsys):
    model, data = setup
    out = tmp_path / "out"
    status = main(["prepare", str(data), "--tokenizer", str(model), "--output", str(out), "--max-length", "4",
                   "--truncation", "drop"])
    captured = capsys.readouterr()
    assert status == 2 and "too_long" in captured.out
    assert captured.err == f"error: {data}: no rows kept: 4 too_long; {out} not written\n"
    assert not out.exists()


def test_prepare_is_listed_and_its_flags_parse():
    from instructune.cli import COMMANDS, build_parser

    assert "prepare" in COMMANDS
    args = build_parser().parse_args(["prepare", "d.jsonl", "--tokenizer", "t", "--output", "o", "--format",
                                      "alpaca", "--output-format", "parquet"])
    assert (args.data_format, args.output_format, Path(args.output)) == ("alpaca", "parquet", Path("o"))
