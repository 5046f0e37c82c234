"""Argument groups that several commands share, each defined once."""

from __future__ import annotations

import argparse
import dataclasses
import json

from instructune.data.formats import FORMATS
from instructune.data.options import ON_BAD_ROW, TRAIN_ON, TRUNCATION, EncodingOptions, OptionError
from instructune.errors import UserError

TEMPLATE_HELP = "built-in name (alpaca, chatml, plain), a .jinja file, or omit for the tokenizer's own"
FORMAT_HELP = ", ".join(FORMATS) + " (default: detected)"


def add_template_argument(parser: argparse.ArgumentParser) -> None:
    """`--template`: which chat template renders the conversations."""
    parser.add_argument("--template", help=TEMPLATE_HELP)


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    """`--format`: the data format, detected when omitted."""
    parser.add_argument("--format", dest="data_format", help=FORMAT_HELP)


def add_encoding_arguments(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    """How rows are read and encoded: template, format, train_on, max_length, truncation, on_bad_row."""
    if template:
        add_template_argument(parser)
    add_format_argument(parser)
    defaults = EncodingOptions()
    parser.add_argument("--train-on", choices=TRAIN_ON, default=defaults.train_on,
                        help=f"which tokens are trained (scored): {', '.join(TRAIN_ON)} "
                             f"(default {defaults.train_on})")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="longest row in tokens (default: no limit)")
    parser.add_argument("--truncation", choices=TRUNCATION, default=defaults.truncation,
                        help=f"what happens to a row longer than --max-length "
                             f"(default {defaults.truncation})")
    parser.add_argument("--on-bad-row", choices=ON_BAD_ROW, default=defaults.on_bad_row,
                        help="a malformed row stops the command (error, default) or is skipped and counted")


def encoding_options(args: argparse.Namespace) -> EncodingOptions:
    """The `EncodingOptions` of a command's encoding flags; a flag the command lacks keeps its default.

    A value out of range is a `UserError` that names the flag (`--max-length must be at least 2 ...`).
    """
    # Each flag's `dest` is the field's name (`--format` stores `data_format`).
    names = [f.name for f in dataclasses.fields(EncodingOptions)]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return EncodingOptions(**values)
    except OptionError as error:
        flag = "--format" if error.field == "data_format" else "--" + error.field.replace("_", "-")
        raise UserError(f"{flag} {error.problem}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device` and `--trust-remote-code`: which model to run and where."""
    parser.add_argument("--model", required=True,
                        help="a Hub id, a model folder or checkpoint, a .gguf file, a LoRA adapter folder, "
                             "or smollm2-135m-instruct")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repository")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, max_new_tokens: int) -> None:
    """`--temperature`, `--top-p`, `--max-new-tokens` and `--seed`, with this command's defaults."""
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    parser.add_argument("--top-p", type=float, default=0.9 if temperature else 1.0, help="nucleus sampling threshold")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def add_config_arguments(parser: argparse.ArgumentParser, example_override: str) -> None:
    """The positional `[CONFIG.yaml] [key=value ...]` of commands that run training."""
    parser.add_argument("arguments", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help=f"a flat YAML config file, then overrides such as {example_override}")


def config_keys_text() -> str:
    """Every configuration key with its default and meaning, for a command's --help epilog."""
    from instructune.train.config import TrainConfig, field_docs

    defaults = TrainConfig().to_dict()
    lines = ["configuration keys (YAML or key=value):"]
    for name, doc in field_docs().items():
        default = json.dumps(defaults[name]) if defaults[name] is not None else "null"
        lines.append(f"  {name} (default {default}): {doc}")
    return "\n".join(lines)


def split_config_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, key=value overrides) from the positional `[CONFIG.yaml] [key=value ...]`."""
    config_path = None
    if arguments and "=" not in arguments[0]:
        config_path, arguments = arguments[0], arguments[1:]
    for text in arguments:
        if "=" not in text:
            raise UserError(f"command line: expected key=value after the config file, got {text!r}")
    return config_path, list(arguments)
