"""The command line: one sub-command per job. Each job lives in its own module, imported on use."""

from __future__ import annotations

import argparse
import os
import sys

from instructune.errors import UserError


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", help="built-in name (alpaca, chatml, plain), a .jinja file, or omit for the tokenizer's own")
    p.add_argument("--format", dest="data_format", help="alpaca, prompt_completion, messages, sharegpt, text (default: detected)")
    p.add_argument("--train-on", choices=["assistant", "last", "all"], default="assistant")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--truncation", choices=["keep_response", "keep_start", "drop"], default="keep_response")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="instructune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="encode a dataset and show which tokens are trained")
    p.add_argument("data", help="a .json/.jsonl/.parquet/.csv file, a folder of them, or a Hugging Face dataset name")
    p.add_argument("--tokenizer", required=True, help="a Hub id, a local folder or a .gguf file")
    _add_data_arguments(p)
    p.add_argument("--limit", type=int, default=3, help="rows to show (the summary always covers all rows)")
    p.add_argument("--html", help="write a self-contained HTML page of the shown rows and the summary")
    p.add_argument("--jsonl", help="write every kept row as {row, input_ids, labels}")
    p.add_argument("--num-proc", type=int, default=None, help="worker processes for encoding (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preparation cache")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from instructune.inspect_command import run_inspect

        return run_inspect(args)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `instructune` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args) or 0
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
