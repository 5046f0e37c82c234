"""The command line: one sub-command per job, each in its own module under `instructune.commands`.

A command module has `HELP` (the one-line summary), optionally `DESCRIPTION` and `EPILOG`, and two
functions: `add_arguments(parser)` and `run(args) -> int`. Heavy imports happen inside `run`, so
`instructune --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from instructune.commands.arguments import check_arguments
from instructune.errors import UserError

COMMANDS = ("inspect", "train", "compare", "study", "explain", "eval", "generate", "chat", "serve", "export")
"""The sub-commands, in the order `--help` lists them; `instructune.commands.<name>` implements each."""


def command_module(name: str) -> ModuleType:
    """The module that implements sub-command `name`."""
    return importlib.import_module(f"instructune.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="instructune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = command_module(name)
        epilog = module.epilog() if hasattr(module, "epilog") else None
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `instructune inspect ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
