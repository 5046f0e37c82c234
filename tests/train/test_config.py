"""The training configuration: keys, defaults, YAML and key=value loading, and every error it reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from instructune.errors import UserError
from instructune.train.config import (
    FIELD_NAMES,
    TrainConfig,
    config_from_dict,
    config_to_yaml,
    field_docs,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]

REQUIRED_KEYS = (
    "model tokenizer template data eval_data eval_fraction format train_on max_length truncation on_bad_row "
    "batch_size grad_accum lr schedule warmup_steps weight_decay max_grad_norm epochs max_steps seed "
    "output_dir lora packing eval_every save_every keep_last loss_normalization resume"
).split()


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_the_issue_keys_exist_and_every_field_has_a_docstring():
    assert set(REQUIRED_KEYS) <= set(FIELD_NAMES)
    docs = field_docs()
    assert set(docs) == set(FIELD_NAMES)
    assert all(doc and "\n" not in doc for doc in docs.values())


def test_documented_defaults():
    config = TrainConfig()
    assert config.model == "smollm2-135m-instruct"
    assert (config.schedule, config.loss_normalization, config.train_on) == ("cosine", "token", "assistant")
    assert config.lora is None and config.packing is False and config.resume is False
    assert config.effective_lr == 2e-5
    assert dataclasses.replace(config, lora={"r": 8}).effective_lr == 2e-4


def test_yaml_then_overrides_win_and_values_are_converted(tmp_path):
    path = write(tmp_path, "data: train.jsonl\nlr: 1e-4\nbatch_size: 4\nmax_length: null\nlora:\n  r: 8\n")
    config = load_config(path, ["batch_size=2", "lora.alpha=32", "schedule=linear", "eval_fraction=0"])
    assert config.data == "train.jsonl"
    assert config.lr == 1e-4 and isinstance(config.lr, float)  # YAML 1.1 reads `1e-4` as a string
    assert config.batch_size == 2 and config.max_length is None
    assert config.lora == {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    assert config.schedule == "linear" and config.eval_fraction == 0.0


def test_lora_shorthands():
    assert load_config(overrides=["lora=true"]).lora["r"] == 16
    assert load_config(overrides=["lora=null"]).lora is None
    assert load_config(overrides=["lora.r=4"]).lora == {"r": 4, "alpha": 8, "dropout": 0.0,
                                                       "target_modules": "all-linear"}
    assert load_config(overrides=["lora={r: 2, target_modules: [q_proj, v_proj]}"]).lora["target_modules"] == [
        "q_proj", "v_proj"]


def test_empty_yaml_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == TrainConfig()


def test_yaml_round_trip_with_comments():
    config = load_config(overrides=["data=x.jsonl", "lora.r=4", "lr=3e-4", "max_steps=7"])
    text = config_to_yaml(config)
    assert "# Peak learning rate" in text
    assert config_from_dict(yaml.safe_load(text)) == config


def test_example_configs_load_and_default_yaml_shows_every_key():
    default = REPO / "configs" / "default.yaml"
    assert set(yaml.safe_load(default.read_text())) == set(FIELD_NAMES)
    load_config(default)
    lora = load_config(REPO / "configs" / "example_lora.yaml")
    assert lora.lora is not None


@pytest.mark.parametrize("text, expected", [
    ("lrr: 0.1\n", "run.yaml, line 1: unknown key 'lrr' (did you mean 'lr'?)"),
    ("data: a.jsonl\nbatchsize: 2\n", "run.yaml, line 2: unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ("data: a.jsonl\n\nlr: fast\n", "run.yaml, line 3: 'lr': expected a number or null, got 'fast'"),
    ("batch_size: 2.5\n", "run.yaml, line 1: 'batch_size': expected an integer, got 2.5"),
    ("packing: yes please\n", "run.yaml, line 1: 'packing': expected true or false, got 'yes please'"),
    ("schedule: exponential\n", "'schedule': expected one of constant, linear, cosine, got 'exponential'"),
    ("loss_normalization: mean\n", "'loss_normalization': expected one of token, sequence, got 'mean'"),
    ("model: null\n", "run.yaml, line 1: 'model': expected a string, got null"),
    ("lora: 8\n", "run.yaml, line 1: 'lora': expected a mapping {r, alpha, dropout, target_modules} or null"),
    ("lora:\n  rank: 8\n", "'lora': unknown LoRA setting 'rank' (did you mean 'r'?)"),
    ("batch_size: 0\n", "run.yaml, line 1: 'batch_size' must be at least 1, got 0"),
    ("eval_fraction: 1.5\n", "'eval_fraction' must be in [0, 1), got 1.5"),
    ("max_steps: 0\n", "'max_steps' must be at least 1"),
    ("max_length: 1\n", "run.yaml, line 1: 'max_length' must be at least 2 (or null), got 1"),
    ("train_on: everything\n", "run.yaml, line 1: 'train_on': expected one of assistant, last, all, got 'everything'"),
    ("data: a.jsonl\nformat: xml\n", "run.yaml, line 2: 'format' must be a known format; unknown data format 'xml'"),
    ("merge_lora: true\n", "'merge_lora' needs `lora`"),
    ("resume: true\noverwrite: true\n", "'overwrite' cannot be combined with resume: true"),
    ("lr: 0.1\nlr: 0.2\n", "run.yaml, line 2: invalid YAML: duplicate key 'lr' (first on line 1)"),
    ("data: [a.jsonl\nlr: 1\n", "run.yaml, line 2: invalid YAML"),
    ("lr: 0.1\n  batch_size: 2\n", "run.yaml, line 2: invalid YAML: mapping values are not allowed here"),
    ("- lr: 0.1\n", "run.yaml: expected a mapping of `key: value` lines, got list"),
])
def test_yaml_errors_name_the_file_line_and_key(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


@pytest.mark.parametrize("override, expected", [
    ("lrr=0.1", "command line: unknown key 'lrr' (did you mean 'lr'?)"),
    ("lr", "command line: expected key=value, got 'lr'"),
    ("epochs=two", "command line: 'epochs': expected an integer, got 'two'"),
    ("seed=1.5", "command line: 'seed': expected an integer, got 1.5"),
    ("eval_fraction=-0.1", "command line: 'eval_fraction' must be in [0, 1), got -0.1"),
    ("batch_size.x=1", "command line: 'batch_size' has no sub-keys"),
    ("lora.dropout=2", "command line: 'lora': LoRA dropout must be a number in [0, 1)"),
])
def test_override_errors_name_the_key(override, expected):
    assert expected in error_of(overrides=[override])


def test_missing_and_unreadable_config_files(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00lr")
    assert "cannot read config file" in error_of(tmp_path / "bin.yaml")


def test_parse_override_reads_values_as_yaml():
    assert parse_override("lr=3e-4") == ("lr", "3e-4")  # converted later by the field's type
    assert parse_override("max_length=null") == ("max_length", None)
    assert parse_override("template=chatml") == ("template", "chatml")
    assert parse_override("output_dir=") == ("output_dir", "")
    assert parse_override("lora={r: 4}") == ("lora", {"r": 4})


def test_saved_configuration_with_an_unknown_key_is_refused():
    with pytest.raises(UserError, match="checkpoint: unknown key 'old_key'"):
        config_from_dict({"old_key": 1}, origin="checkpoint")


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    (folder / "data").mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl", "chat.jinja"):
        (folder / "data" / name).write_text("")
    (tmp_path / "project" / "common.jsonl").write_text("")
    (folder / "run.yaml").write_text("data: data/train.jsonl\neval_data: ../common.jsonl\ntemplate: data/chat.jinja\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the paths still point into the config's folder
    config = load_config(folder / "run.yaml")
    assert Path(config.data) == folder / "data" / "train.jsonl"
    assert Path(config.eval_data) == tmp_path / "project" / "common.jsonl"
    assert Path(config.template) == folder / "data" / "chat.jinja"
    # From the command line, relative paths are the current folder's, as any command's.
    config = load_config(folder / "run.yaml", ["data=data/train.jsonl", "template=chatml"])
    assert config.data == "data/train.jsonl" and config.template == "chatml"


@pytest.mark.parametrize("text, expected", [
    ("data: tatsu-lab/alpaca\n", "tatsu-lab/alpaca"),  # a Hub dataset name, not a file there
    ("data: name:train\n", "name:train"),
    ("data: ./tatsu-lab/alpaca\n", "{folder}/tatsu-lab/alpaca"),  # ./ says: a path, from the config's folder
    ("template: chatml\n", "chatml"),
    ("data: /abs/data.jsonl\n", "/abs/data.jsonl"),
])
def test_names_that_are_not_paths_next_to_the_config_stay_as_they_are(tmp_path, text, expected):
    (tmp_path / "run.yaml").write_text(text)
    config = load_config(tmp_path / "run.yaml")
    assert (config.template if text.startswith("template") else config.data) == expected.format(folder=tmp_path)


def test_the_shipped_configs_find_their_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("default.yaml", "example_lora.yaml"):
        config = load_config(REPO / "configs" / name)
        assert Path(config.data).is_file() and Path(config.eval_data).is_file()
    monkeypatch.chdir(REPO)
    config = load_config("configs/default.yaml")
    assert config.data == "src/instructune/resources/default_qa/train.jsonl"
