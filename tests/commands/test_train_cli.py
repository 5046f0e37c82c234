"""`instructune train` end to end on a tiny model, the default job's plumbing, and every config error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructune.cli import main
from instructune.train.metrics import read_metrics
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
    assert "had already finished" in capsys.readouterr().out


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
