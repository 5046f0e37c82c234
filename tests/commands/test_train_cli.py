"""`instructune train` end to end on a tiny model, the default job's plumbing, and every config error."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instructune.cli import main
from instructune.train.metrics import loss_curves, read_metrics
from train_fixtures import write_tiny_model, write_toy_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def test_train_command_end_to_end(tiny, tmp_path):
    model, data = tiny
    work = tmp_path / "work"
    work.mkdir()
    (work / "toy.yaml").write_text(
        f"model: {model}\ndata: {data}\nbatch_size: 4\nlr: 1e-2\nmax_steps: 24\neval_every: 12\nsave_every: 12\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "instructune", "train", "toy.yaml", "keep_last=1", "log_every=4"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = work / "runs" / "toy"  # output_dir defaults to runs/<config name>
    assert "model saved in runs/toy/checkpoint-24" in done.stdout
    assert "step 24/24" in done.stdout and "Traceback" not in done.stderr
    assert sorted(p.name for p in work.iterdir()) == ["runs", "toy.yaml"]  # writes only under the folder
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-24", "config.yaml", "loss.png", "metrics.jsonl"]

    records = read_metrics(run)
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
    assert [r["step"] for r in records if r["split"] == "eval"] == [12, 24]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = run / "checkpoint-24"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model_out = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert tokenizer.chat_template and model_out.config.vocab_size == len(tokenizer)
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 24" in saved and "keep_last: 1" in saved


def test_default_job_plumbing_with_a_tiny_model(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["train", f"model={tiny[0]}", "max_steps=2", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "contains the expected answer:" in out and "→" in out
    assert "held-out response loss:" in out
    assert "model saved in runs/default/checkpoint-2" in out
    answers = [json.loads(line) for line in (tmp_path / "runs/default/heldout_answers.jsonl").read_text().splitlines()]
    assert len(answers) > 20 and {"question", "answer", "before", "after"} <= set(answers[0])
    # Running it again refuses to overwrite; resuming the finished run is fine.
    assert main(["train", f"model={tiny[0]}", "max_steps=2", "batch_size=2"]) == 2
    assert "runs/default already holds a run (checkpoint-2); add resume=true to the command" in capsys.readouterr().err
    assert main(["train", f"model={tiny[0]}", "max_steps=2", "batch_size=2", "resume=true"]) == 0
    resumed = capsys.readouterr().out
    assert "had already finished" in resumed
    # The base model, loaded again for the "before" column, has the same weights: its answers are cached.
    assert "its held-out loss: kept from an earlier run" in resumed


def test_default_job_progress_step_zero_and_base_answers_kept_for_the_next_run(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    job = ["train", f"model={tiny[0]}", "max_steps=2", "batch_size=2"]
    assert main(job) == 0
    out = capsys.readouterr().out
    assert "on the packaged question-answer set" in out.splitlines()[0]
    # Progress lines while answering, before and after training, each ending with the count and the rate.
    for which in ("base model", "fine-tuned model"):
        assert f"answering the held-out questions with the {which}: 62 questions ..." in out
        assert re.search(rf"with the {which}: 62/62 answered in \d+ s \([\d.]+ questions/s, \d+ tokens/s\)", out)
    # The base model's evaluation is step 0 of the metrics (and so of loss.png): the loss printed "before".
    before = float(re.search(r"held-out response loss: ([\d.]+) →", out).group(1))
    evals = [r for r in read_metrics(tmp_path / "runs/default") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and round(evals[0]["loss"], 3) == before
    assert loss_curves(read_metrics(tmp_path / "runs/default"))[1][0] == (0, evals[0]["loss"])  # drawn first
    answers = (tmp_path / "runs/default/heldout_answers.jsonl").read_text()

    # Run again: the same base weights, questions and settings, so the base answers come from the cache.
    assert main([*job, "overwrite=true"]) == 0
    again = capsys.readouterr().out
    assert "the base model's answers to the 62 held-out questions and its held-out loss: kept from an earlier run" in again
    assert "answering the held-out questions with the base model" not in again
    assert f"held-out response loss: {before:.3f} →" in again
    assert (tmp_path / "runs/default/heldout_answers.jsonl").read_text() == answers
    assert [r["step"] for r in read_metrics(tmp_path / "runs/default") if r["split"] == "eval"] == [0, 2]
    # Another model misses the cache (its fingerprint differs) and answers again.
    other = write_tiny_model(tmp_path / "other", seed=5)
    assert main(["train", f"model={other}", "max_steps=2", "batch_size=2", "output_dir=runs/other"]) == 0
    assert "answering the held-out questions with the base model: 62/62" in capsys.readouterr().out


def test_default_job_names_the_data_it_trains_on(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["train", f"model={tiny[0]}", f"data={tiny[1]}", "max_steps=1", "batch_size=2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"on {tiny[1]} (responses trained" in first and "packaged" not in first


@pytest.mark.parametrize("content, expected", [
    ("", "no rows to read"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2: invalid JSON"),
])
def test_bad_data_is_reported_before_an_existing_run_in_the_output_folder(tiny, tmp_path, monkeypatch, capsys,
                                                                          content, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    held = tmp_path / "runs/default"
    (held / "checkpoint-2").mkdir(parents=True)
    (held / "checkpoint-2" / "COMPLETE").write_text("")
    (held / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    (tmp_path / "my.jsonl").write_text(content)
    assert main(["train", f"model={tiny[0]}", "data=my.jsonl", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "my.jsonl" in err and "already holds a run" not in err
    assert sorted(p.name for p in held.iterdir()) == ["checkpoint-2", "metrics.jsonl"]  # left as it was
    # With good data, the folder's run is the problem to report.
    write_toy_data(tmp_path / "my.jsonl")
    assert main(["train", f"model={tiny[0]}", "data=my.jsonl", "max_steps=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, arguments, expected", [
    ("lrr: 1\n", [], "error: bad.yaml, line 1: unknown key 'lrr' (did you mean 'lr'?)"),
    ("data: x.jsonl\nepochs: many\n", [], "error: bad.yaml, line 2: 'epochs': expected an integer, got 'many'"),
    ("data: [x\n", [], "error: bad.yaml, line 2: invalid YAML"),
    ("lora:\n  r: -1\n", [], "error: bad.yaml, line 1: 'lora': LoRA r (the rank) must be a positive whole number"),
    ("", ["batch_size=none"], "error: command line: 'batch_size': expected an integer, got 'none'"),
    ("", ["warmup=3"], "error: command line: unknown key 'warmup' (did you mean 'warmup_steps'?)"),
    ("", ["max_steps=3", "oops"], "error: command line: expected key=value after the config file, got 'oops'"),
    ("", ["schedule=step"], "error: command line: 'schedule': expected one of constant, linear, cosine"),
    ("", [], "error: 'data' is not set: give the training data in the config or as data=PATH"),
    ("data: missing.jsonl\n", [], "missing.jsonl"),
])
def test_configuration_errors_are_one_line_without_traceback(tiny, tmp_path, monkeypatch, capsys,
                                                              yaml_text, arguments, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml_text)
    assert main(["train", "bad.yaml", f"model={tiny[0]}", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(capsys):
    assert main(["train", "no-such.yaml"]) == 2
    assert capsys.readouterr().err == "error: config file not found: no-such.yaml\n"


def test_default_job_override_errors(capsys):
    assert main(["train", "lr=fast"]) == 2
    assert capsys.readouterr().err == "error: command line: 'lr': expected a number or null, got 'fast'\n"


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    from instructune.train.config import FIELD_NAMES

    assert all(f"  {name} (default" in out for name in FIELD_NAMES)


def test_the_readme_main_command_is_the_default_job():
    from instructune.study.default_job import dataset_file, default_job_config

    config = default_job_config()
    assert Path(config.data) == dataset_file("train.jsonl") and Path(config.eval_data) == dataset_file("heldout.jsonl")
    assert config.model == "smollm2-135m-instruct" and config.lora is None
    assert dataset_file("train.jsonl").is_file() and dataset_file("heldout.jsonl").is_file()
    # configs/default.yaml shows the very same job (with the data paths as seen from the repository root).
    from instructune.train.config import load_config

    shown = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    assert dataclasses.replace(shown, data=config.data, eval_data=config.eval_data) == config


def test_default_job_says_so_before_converting_a_gguf_model(tmp_path, monkeypatch):
    from rich.console import Console

    from instructune.model.load import resolve_model_path
    from instructune.study.default_job import _note_conversion

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    console = Console(record=True, width=300)
    _note_conversion(str(gguf), console)
    assert "converting model.gguf into an fp32 model in" in console.export_text()
    resolve_model_path(gguf).converted.mkdir(parents=True)  # converted (folders appear complete, by rename)
    _note_conversion(str(gguf), console)
    _note_conversion(str(tmp_path / "a-folder-model"), console)  # not a GGUF (and missing): nothing to say
    assert console.export_text() == ""
