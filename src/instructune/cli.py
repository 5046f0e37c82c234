"""The command line: one sub-command per job, each in its own module under `instructune.commands`.

A command module has `HELP` (the one-line summary), `EXAMPLES` (the lines its `--help` ends with),
optionally `DESCRIPTION` and `epilog()`, and two functions: `add_arguments(parser)` and
`run(args) -> int`. Heavy imports happen inside `run`, so `instructune --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from types import ModuleType

from instructune.commands.arguments import check_arguments
from instructune.errors import UserError

COMMANDS = ("inspect", "prepare", "train", "compare", "study", "explain", "eval", "generate", "chat", "serve", "export")
"""The sub-commands, in the order `--help` lists them; `instructune.commands.<name>` implements each."""


def command_module(name: str) -> ModuleType:
    """The module that implements sub-command `name`."""
    return importlib.import_module(f"instructune.commands.{name}")


DESCRIPTION = ("Fine-tune a causal language model on instructions, training only on the responses (exact "
               "instruction masking), and see, compare and use the result. `instructune train` with no "
               "arguments runs a short default job; `instructune COMMAND --help` tells more about a command.")
"""What `instructune --help` says first: for the user, not about the code (the module docstring is that)."""

EXAMPLES = """examples:
  instructune train
  instructune inspect data.jsonl --tokenizer smollm2-135m-instruct --limit 2
  instructune chat --model runs/default/checkpoint-57"""
"""What `instructune --help` ends with: the default job, the masks of your data, a chat with the result."""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description to the terminal; keeps an epilog's lines (the examples, the list of
    configuration keys) as they are written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def command_epilog(module: ModuleType) -> str:
    """What a command's `--help` ends with: its example lines, then its own epilog if it has one."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in module.EXAMPLES)
    if hasattr(module, "epilog"):
        text += "\n\n" + module.epilog()
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="instructune", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           epilog=command_epilog(module), formatter_class=_HelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `instructune` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)  # every flag's range, by the rules a config's keys follow too
        return command_module(args.command).run(args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # A training run stopped by a signal (instructune.train.stopping) says where it stopped and how to
        # resume, and has its own exit status; under torchrun rank 0 alone says it.
        if os.environ.get("RANK", "0") == "0":
            print(str(stop) or "interrupted", file=sys.stderr)
        return getattr(stop, "exit_status", 130)
    except BrokenPipeError:
        # `instructune inspect ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A write this code did not report itself (each of its own names the path and the room needed).
        where = f" writing {error.filename}" if error.filename else ""
        print(f"error: no space left on the device{where}: {error.strerror}; free some space or write elsewhere",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
