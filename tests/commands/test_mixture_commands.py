"""A mixture config end to end: `train` trains on exactly the rows `inspect CONFIG` and `prepare CONFIG` show,
each row carries its source and row; a bad mixture is one line before any model is loaded."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from instructune.cli import main
from train_fixtures import write_tiny_model


def write_sources(folder: Path) -> None:
    """Alpaca JSONL, a Parquet file of `messages`, a CSV of question/answer (renamed to prompt/completion)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca.jsonl").write_text("".join(
        json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."}) + "\n" for i in range(30)))
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": f"Hello {i}"},
                                                       {"role": "assistant", "content": f"Hello world {i}!"}]}
                                         for i in range(20)]), folder / "chat.parquet")
    with (folder / "pc.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows([[f"How are you {i}?", f"I am fine, thank you {i}."] for i in range(6)])


MIXTURE = [
    {"path": "data/alpaca.jsonl", "rows": 12},
    {"path": "data/chat.parquet", "label": "chat", "fraction": 0.5, "system": "Be brief."},
    {"path": "data/pc.csv", "label": "pc", "columns": {"prompt": "question", "completion": "answer"}, "weight": 1,
     "eval_split": 0},
]


@pytest.fixture()
def run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    model = write_tiny_model(tmp_path / "model")
    write_sources(tmp_path / "cfg" / "data")
    config = tmp_path / "cfg" / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "data": MIXTURE, "eval_fraction": 0.2, "dedupe": "exact", "output_dir": str(tmp_path / "run"),
        "batch_size": 4, "lr": 1e-2, "max_steps": 3, "eval_every": 0, "save_every": 0, "max_length": 64}))
    return config


def test_train_inspect_and_prepare_agree_on_the_mixture(tmp_path, run_config, capsys):
    import datasets

    from instructune.train.config import load_config
    from instructune.train.setup import setup_run
    from instructune.train.training_data import rows_of_config

    assert main(["inspect", str(run_config), "--limit", "1", "--jsonl", str(tmp_path / "rows.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "Sources: rows" in printed and "source 0" in printed
    inspected = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    sources = [r["source"] for r in inspected]
    chat = rows_of_config(run_config).mixture.sources[1]
    assert chat.available == 20 - chat.held_out and chat.taken == (chat.available + 1) // 2  # fraction 0.5
    assert sources == ["0"] * 12 + ["chat"] * chat.taken + ["pc"] * 6
    assert list(inspected[0]) == ["source", "row", "input_ids", "labels"]

    assert main(["prepare", str(run_config), "--output", str(tmp_path / "hf")]) == 0
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.column_names == ["input_ids", "labels", "attention_mask", "row", "source"]
    assert [(r["source"], r["row"], r["input_ids"]) for r in loaded] == [
        (r["source"], r["row"], r["input_ids"]) for r in inspected]

    capsys.readouterr()
    run = setup_run(load_config(run_config), name="run")
    printed = capsys.readouterr().out
    assert [(r.source, r.row, r.input_ids) for r in run.train_rows] == [
        (r["source"], r["row"], r["input_ids"]) for r in inspected]
    held = {(r.source, r.row) for r in run.eval_rows}
    assert held and not held & {(r["source"], r["row"]) for r in inspected}
    assert {source for source, _ in held} <= {"0", "chat"}  # pc holds nothing out (eval_split: 0)
    assert "data 0 (" in printed and "data 'chat' (" in printed and "12 taken of" in printed
    assert f"mixture: {len(inspected)} training rows from 3 source(s), {len(held)} evaluation rows" in printed


def test_a_mixture_trains_and_saves_its_sources_in_the_config(tmp_path, run_config):
    assert main(["train", str(run_config)]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [source["path"] for source in saved["data"]] == [
        str(tmp_path / "cfg" / "data" / name) for name in ("alpaca.jsonl", "chat.parquet", "pc.csv")]
    assert saved["dedupe"] == "exact"


@pytest.mark.parametrize("change, message", [
    ({"data": [{"path": "data/alpaca.jsonl", "rows": 3, "fraction": 0.5}]},
     "run.yaml, line 2: 'data': data source 0 ({folder}/data/alpaca.jsonl): give one of 'rows', 'fraction' or "
     "'weight'"),
    ({"data": [{"path": "data/nothing.jsonl"}]}, "data source 0 (data/nothing.jsonl): 'path': no such file or folder"),
    ({"data": [{"path": "data/pc.csv", "columns": {"prompt": "q"}}]},
     "data source 0 ({folder}/data/pc.csv), row 0: 'columns' maps 'prompt' to the column 'q'"),
    ({"eval_data": "data/alpaca.jsonl", "data": [{"path": "data/chat.parquet", "eval_rows": 2}]},
     "'eval_rows' holds rows out of the source, but 'eval_data' is set too"),
    ({"mixture_rows": 0}, "'mixture_rows' must be at least 1"),
])
def test_a_bad_mixture_is_one_line_before_any_model_is_loaded(tmp_path, run_config, monkeypatch, capsys, change,
                                                              message):
    import instructune.model.load as load

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(load, "load_tokenizer", no_loading)
    monkeypatch.setattr(load, "load_model", no_loading)
    values = yaml.safe_load(run_config.read_text())
    values.pop("data")
    values = {"model": values.pop("model"), **change, **values} if "data" in change else {**values, **change,
                                                                                          "data": MIXTURE}
    run_config.write_text(yaml.safe_dump(values, sort_keys=False))
    for command in (["train", str(run_config)], ["inspect", str(run_config)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message.format(folder=run_config.parent) in err and "Traceback" not in err
