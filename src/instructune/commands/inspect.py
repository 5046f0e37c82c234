"""`instructune inspect`: encode a dataset as training would, and show which tokens are trained."""

from __future__ import annotations

import argparse

from instructune.commands.arguments import add_encoding_arguments, encode_data_argument, encoding_options
from instructune.errors import UserError

HELP = "encode a dataset and show which tokens are trained"
EXAMPLES = (
    'instructune inspect data.jsonl --tokenizer smollm2-135m-instruct --limit 2',
    'instructune inspect data.jsonl --tokenizer smollm2-135m-instruct --html masks.html --jsonl rows.jsonl',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, the tokenizer, how to encode, and what to show or write."""
    p.add_argument("data", help="a .json/.jsonl/.parquet/.csv file, a folder of them, a Hugging Face dataset name, "
                                "or a training config (.yaml): exactly the rows `instructune train` prepares from it")
    p.add_argument("--tokenizer", help="a Hub id, a local folder or a .gguf file (with a config: its tokenizer "
                                       "or model unless given)")
    add_encoding_arguments(p)
    p.add_argument("--limit", type=int, default=3, help="rows to show (the summary always covers all rows)")
    p.add_argument("--html", help="write a self-contained HTML page of the shown rows and the summary")
    p.add_argument("--jsonl", help="write every kept row as {row, input_ids, labels}")
    p.add_argument("--num-proc", type=int, default=None, help="worker processes for encoding (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preparation cache")


def run(args: argparse.Namespace) -> int:
    """Prepare `args.data`, print the first `--limit` rows and the summary, write `--html`/`--jsonl`."""
    from rich.console import Console

    from instructune.data.prepare import nothing_kept
    from instructune.data.templates import check_template_choice
    from instructune.show.html import write_html
    from instructune.show.jsonl import write_jsonl
    from instructune.show.mixture import sources_tables
    from instructune.show.summary import render_summary, render_table
    from instructune.show.terminal import print_rows
    from instructune.show.tokens import row_view
    from instructune.train.training_data import rows_of_config

    if args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")
    options = encoding_options(args)
    check_template_choice(options.template)  # a broken template file: one line, before anything is loaded
    tables = []
    if is_config(args.data):
        refuse_encoding_flags(args, options)
        prepared = rows_of_config(args.data, args.tokenizer, cache=not args.no_cache)
        tokenizer, args.tokenizer = prepared.tokenizer, prepared.tokenizer_name
        tables = sources_tables(prepared.mixture.sources) if prepared.mixture is not None else []
    else:
        prepared, tokenizer = encode_data_argument(args, options)
    views = [row_view(row, tokenizer) for row in prepared.rows[:args.limit]]

    console = Console(highlight=False)
    print_rows(console, views)
    if views:
        console.print()
    for table in tables:
        console.print(render_table(table))
        console.print()
    console.print(render_summary(prepared.report))
    if args.jsonl or args.html:
        console.print()
    if not prepared.rows:  # the summary above says why; an empty --jsonl would only hide it
        if args.html:
            write_html(args.html, views, prepared.report, subtitle=f"{args.data} · tokenizer {args.tokenizer}",
                       tables=tables)
            console.print(f"wrote the summary to {args.html}", markup=False, soft_wrap=True)
        raise UserError(f"{args.data}: {nothing_kept(prepared.report)} (see the summary above)"
                        + (f"; {args.jsonl} not written" if args.jsonl else ""))
    if args.jsonl:
        count = write_jsonl(args.jsonl, prepared.rows)
        console.print(f"wrote {count:,} row(s) to {args.jsonl}", markup=False, soft_wrap=True)
    if args.html:
        write_html(args.html, views, prepared.report, subtitle=f"{args.data} · tokenizer {args.tokenizer}",
                   tables=tables)
        console.print(f"wrote {len(views)} row(s) and the summary to {args.html}", markup=False, soft_wrap=True)
    return 0


CONFIG_SUFFIXES = (".yaml", ".yml")


def is_config(data: str) -> bool:
    """Whether the DATA argument names a training config rather than data."""
    return str(data).lower().endswith(CONFIG_SUFFIXES)


def refuse_encoding_flags(args: argparse.Namespace, options) -> None:
    """A training config carries the encoding settings; flags beside it would contradict it."""
    from instructune.data.options import DEFAULT_ENCODING

    if options != DEFAULT_ENCODING:
        raise UserError(f"{args.data} is a training config: give the encoding settings in it (or as a source's "
                        "keys), not as flags")
