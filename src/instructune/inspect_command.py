"""`instructune inspect`: encode a dataset as training would, and show which tokens are trained."""

from __future__ import annotations

import argparse

from instructune.errors import UserError


def run_inspect(args: argparse.Namespace) -> int:
    """Prepare `args.data`, print the first `--limit` rows and the summary, write `--html`/`--jsonl`."""
    from rich.console import Console

    from instructune.data.prepare import prepare_dataset
    from instructune.model import load_tokenizer
    from instructune.show.html import write_html
    from instructune.show.jsonl import write_jsonl
    from instructune.show.summary import render_summary
    from instructune.show.terminal import print_rows
    from instructune.show.tokens import row_view

    if args.limit < 0:
        raise UserError(f"--limit must be 0 or more, got {args.limit}")
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=getattr(args, "trust_remote_code", False))
    prepared = prepare_dataset(
        args.data, tokenizer, template=args.template, data_format=args.data_format, train_on=args.train_on,
        max_length=args.max_length, truncation=args.truncation, on_bad_row=args.on_bad_row,
        num_proc=args.num_proc, cache_dir=False if args.no_cache else None,
    )
    views = [row_view(row, tokenizer) for row in prepared.rows[:args.limit]]

    console = Console(highlight=False)
    print_rows(console, views)
    if views:
        console.print()
    console.print(render_summary(prepared.report))
    if args.jsonl or args.html:
        console.print()
    if args.jsonl:
        count = write_jsonl(args.jsonl, prepared.rows)
        console.print(f"wrote {count:,} row(s) to {args.jsonl}", markup=False, soft_wrap=True)
    if args.html:
        write_html(args.html, views, prepared.report, subtitle=f"{args.data} · tokenizer {args.tokenizer}")
        console.print(f"wrote {len(views)} row(s) and the summary to {args.html}", markup=False, soft_wrap=True)
    return 0
