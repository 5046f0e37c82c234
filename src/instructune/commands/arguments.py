"""Argument groups that several commands share, each defined once."""

from __future__ import annotations

import argparse
import dataclasses
import json

from instructune.data.formats import FORMATS
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

TEMPLATE_HELP = "built-in name (alpaca, chatml, plain), a .jinja file, or omit for the tokenizer's own"
FORMAT_HELP = ", ".join(FORMATS) + " (default: detected)"


def add_template_argument(parser: argparse.ArgumentParser) -> None:
    """`--template`: which chat template renders the conversations."""
    parser.add_argument("--template", help=TEMPLATE_HELP)


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    """`--format`: the data format, detected when omitted."""
    parser.add_argument("--format", dest="data_format", help=FORMAT_HELP)


def add_encoding_arguments(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    """How rows are read and encoded: template, format, train_on, max_length, truncation, on_bad_row,
    history, reasoning, train_on_eos, system_role and template_vars."""
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
    parser.add_argument("--history", choices=HISTORY, default=defaults.history,
                        help="templates that rewrite earlier turns: one row per turn when needed (auto, default), "
                             "always (expand), or drop the row")
    parser.add_argument("--reasoning", choices=REASONING, default=defaults.reasoning,
                        help="reasoning of trained turns: train (default) or mask (context only)")
    parser.add_argument("--train-on-eos", choices=TRAIN_ON_EOS, default=defaults.train_on_eos,
                        help="closing tokens trained: turn (each trained turn's, default), last, all, none")
    parser.add_argument("--system-role", choices=SYSTEM, default=defaults.system_role,
                        help="system messages: keep (default), merge (into the first user turn) or drop")
    parser.add_argument("--template-vars", default=defaults.template_vars, metavar="JSON",
                        help="extra template variables as a JSON object, e.g. '{\"functions\": []}'")


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


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a flag out of its range (`--num-proc must be at least 1, got 0`) before anything is loaded,
    by the same rules (`instructune.ranges.SETTING_RANGES`) that the configuration's keys follow."""
    from instructune.ranges import SETTING_RANGES, setting_problem

    for name in SETTING_RANGES:
        problem = setting_problem(name, getattr(args, name, None))
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {problem}")


class LineProgress:
    """The progress of long passes as plain lines on stderr, where a bar would not show (not a terminal):
    a line when a pass starts, then one at most every `every_s` seconds, and one when it is done.
    It takes the calls of `rich.progress.Progress` that the passes make (`add_task`, `advance`)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.tasks: list[dict] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        """Start a pass of `total` items; returns its handle."""
        import time

        now = time.perf_counter()
        self.tasks.append({"description": description, "total": total or 0, "done": 0, "started": now,
                           "shown": now})
        self._line(self.tasks[-1], "started")
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        """`advance` more items of pass `task` are done."""
        import time

        state, now = self.tasks[task], time.perf_counter()
        state["done"] += advance
        finished = state["total"] and state["done"] >= state["total"]
        if finished or now - state["shown"] >= self.every_s:
            state["shown"] = now
            self._line(state, f"{now - state['started']:.0f} s" + (", done" if finished else ""))

    def _line(self, state: dict, note: str) -> None:
        import sys

        print(f"{state['description']}: {state['done']:.0f}/{state['total']} ({note})", file=sys.stderr, flush=True)


def progress_display():
    """A progress bar on stderr when it is a terminal (`rich.progress.Progress`), else `LineProgress`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def encode_data_argument(args: argparse.Namespace, options: EncodingOptions):
    """DATA (a file, folder or Hub dataset) encoded with `--tokenizer` and the encoding flags: the path
    `inspect` and `prepare` share when DATA is not a training config. Returns (prepared rows, tokenizer)."""
    from instructune.api import encode, options_as_keywords
    from instructune.model.load import load_tokenizer

    if not args.tokenizer:
        raise UserError("--tokenizer is required (a Hub id, a local folder or a .gguf file), unless DATA is a "
                        "training config")
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=getattr(args, "trust_remote_code", False))
    prepared = encode(args.data, tokenizer, **options_as_keywords(options), num_proc=args.num_proc,
                      cache=not args.no_cache)
    return prepared, tokenizer
