"""The configuration of `instructune study`: the shipped study's settings, or the user's config file.

With no CONFIG the study is the shipped miniature of the papers' setup: the default model, the
packaged `alpaca_lengths` rows (for the length regimes) or `default_qa` (for `as_is`), few rows, three
epochs. The keys the study sets per arm (`STUDY_SET_BY_THE_STUDY`) cannot be overridden.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

from instructune.errors import UserError
from instructune.train.config import TrainConfig, load_config

SHIPPED_SETTINGS = {
    "model": "smollm2-135m-instruct",
    "max_length": 192,
    "batch_size": 4,
    "grad_accum": 1,
    "epochs": 3,
    "lr": 1e-4,
    "schedule": "cosine",
    "warmup_steps": 2,
    "log_every": 5,
}
"""The shipped study's training settings: 3 epochs of a few dozen rows, batches of 4 (enough steps per
epoch to move), a learning rate at which 135M parameters visibly learn in that many steps."""

DEFAULT_OUTPUT = "runs/study"


def packaged_file(dataset: str, name: str) -> Path:
    """A file of a data set under `instructune/resources/`."""
    return Path(str(resources.files("instructune") / "resources" / dataset / name))


def default_sources(regime: str) -> tuple[str, str | None]:
    """(data, held-out source) of the shipped study for a regime."""
    if regime == "as_is":
        return str(packaged_file("default_qa", "train.jsonl")), str(packaged_file("default_qa", "heldout.jsonl"))
    return str(packaged_file("alpaca_lengths", "rows.jsonl")), None


def study_config(config_path: str | None, overrides: list[str], regime: str) -> TrainConfig:
    """The settings every arm shares: the shipped study's, or CONFIG.yaml's, with the overrides."""
    from instructune.study.sweep import STUDY_SET_BY_THE_STUDY

    keys = {text.partition("=")[0].strip() for text in overrides}
    fixed = sorted(keys & set(STUDY_SET_BY_THE_STUDY) - {"data", "eval_data"})
    if fixed:
        raise UserError(f"command line: {fixed[0]!r} cannot be set: the study sets it for each arm "
                        "(--weights, --seeds; data through data= and --regime)")
    if config_path is None:
        data, heldout = default_sources(regime)
        base = {**SHIPPED_SETTINGS, "data": data}
        if heldout and "data" not in keys:
            base["eval_data"] = heldout
        config = load_config(None, overrides, base=base, base_origin="study default")
    else:
        config = load_config(config_path, overrides)
    if not config.data:
        raise UserError("'data' is not set: give the rows to study in the config or as data=PATH")
    if config.max_steps is not None:
        raise UserError("the study runs whole epochs: remove max_steps and set epochs")
    return replace(config, output_dir=config.output_dir or DEFAULT_OUTPUT)
