"""`instructune eval`: response loss, perplexity, token accuracy and generation metrics on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from instructune.commands.arguments import (
    add_encoding_arguments,
    add_model_arguments,
    encoding_options,
    progress_display,
)
from instructune.errors import UserError

HELP = "response loss, perplexity, token accuracy and generation metrics on a dataset"
EXAMPLES = (
    'instructune eval --model runs/default/checkpoint-57',
    'instructune eval data.jsonl --model runs/default/checkpoint-57 --limit 50 --output eval-out/',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, the model, how rows are encoded, and how answers are generated."""
    p.add_argument("data", nargs="?", help="a dataset file, folder or Hub name (default: the built-in held-out set)")
    add_model_arguments(p)
    add_encoding_arguments(p)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N rows only, in both passes: loss and generation (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-generate", action="store_true", help="only the loss metrics")
    p.add_argument("--output", help="folder for rows.jsonl and totals.json")


def run(args: argparse.Namespace) -> int:
    """Evaluate `--model` on `args.data` (default: the built-in held-out set); print and write the results."""
    from rich.console import Console

    from instructune.api import evaluate, load, options_as_keywords
    from instructune.use.evaluate import default_eval_data, totals_table, write_results
    from instructune.use.text_metrics import rouge_available

    options = encoding_options(args)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    data = args.data or default_eval_data()
    console = Console(highlight=False)
    if not args.data:
        console.print(f"data: the built-in held-out set ({data})", markup=False, soft_wrap=True)
    loaded = load(args.model, template=options.template, device=args.device,
                  trust_remote_code=args.trust_remote_code)
    if not args.no_generate and not rouge_available():
        console.print("note: ROUGE-L needs the `rapidfuzz` package (pip install 'instructune[eval]'); "
                      "it is left out", markup=False, soft_wrap=True)
    with progress_display() as bars:
        evaluation = evaluate(loaded, data, limit=args.limit, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, generate=not args.no_generate, progress=bars,
                              **options_as_keywords(options))
    results, totals = evaluation.rows, evaluation.totals
    console.print(totals_table(totals))
    if args.output:
        meta = {"model": args.model, "data": data, "template": options.template or "model",
                "train_on": options.train_on, "max_new_tokens": args.max_new_tokens}
        write_results(args.output, results, totals, meta)
        console.print(f"wrote {Path(args.output) / 'rows.jsonl'} and {Path(args.output) / 'totals.json'}",
                      markup=False, soft_wrap=True)
    return 0
