"""Every numeric option is checked by one rule, whether it comes from a flag or from a config key: one
line, exit 2, no traceback, before anything is loaded (the model, tokenizer and data named here do not
exist, so only the option can be what the error is about)."""

from __future__ import annotations

import pytest

from instructune.cli import main

MISSING = ["--model", "no/such-model-dir/"]


@pytest.mark.parametrize("argv, expected", [
    (["inspect", "d.jsonl", "--tokenizer", "no/such/dir/", "--num-proc", "0"], "--num-proc must be at least 1, got 0"),
    (["eval", "d.jsonl", *MISSING, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["eval", "d.jsonl", *MISSING, "--limit", "0"], "--limit must be at least 1, got 0"),
    (["eval", "d.jsonl", *MISSING, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "p.txt", *MISSING, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "p.txt", *MISSING, "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["generate", "p.txt", *MISSING, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "p.txt", *MISSING, "--temperature", "-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["generate", "p.txt", *MISSING, "--temperature", "nan"], "--temperature must be 0 (greedy) or more, got nan"),
    (["generate", "p.txt", *MISSING, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["generate", "p.txt", *MISSING, "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["chat", *MISSING, "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["chat", *MISSING, "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["explain", *MISSING, "--instruction", "q", "--response", "a", "--top-k", "-1"],
     "--top-k must be 0 or more, got -1"),
    (["compare", "--examples", "-1"], "--examples must be 0 or more, got -1"),
    (["compare", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
])
def test_a_flag_out_of_range_is_one_line(capsys, argv, expected):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


@pytest.mark.parametrize("key, value, expected", [
    ("num_proc", 0, "'num_proc' must be at least 1, got 0"),
    ("batch_size", 0, "'batch_size' must be at least 1, got 0"),
    ("seed", -1, "'seed' must be 0 or more, got -1"),
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_same_rule_holds_for_a_config_key(tmp_path, monkeypatch, capsys, command, key, value, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(f"model: no/such-model-dir/\ndata: d.jsonl\n{key}: {value}\n")
    assert main([command, "run.yaml"]) == 2
    assert capsys.readouterr().err == f"error: run.yaml, line 3: {expected}\n"
    assert main([command, "run.yaml", f"{key}=1", f"{key}={value}"]) == 2
    assert capsys.readouterr().err == f"error: command line: {expected}\n"
    assert not (tmp_path / "runs").exists()
