"""`instructune prepare`: encode a dataset as training would and write the rows for other trainers."""

from __future__ import annotations

import argparse

from instructune.commands.arguments import add_encoding_arguments, encode_data_argument, encoding_options

HELP = "encode a dataset with its masks and write it as a dataset folder (for TRL, Trainer, ...)"
EXAMPLES = (
    'instructune prepare data.jsonl --tokenizer smollm2-135m-instruct --output prepared/ --max-length 512',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
DESCRIPTION = ("Encode a dataset exactly as `instructune train` does and write the rows as a Hugging Face "
               "dataset folder (`datasets.load_from_disk(DIR)`), or Parquet or JSONL, with columns input_ids, "
               "labels (-100 where a token is not trained), attention_mask and row (the source row), and the "
               "preparation summary in DIR/preparation.json. TRL's SFTTrainer and transformers' Trainer "
               "(with instructune.Collator) train on exactly these labels.")
OUTPUT_FORMATS = ("hf", "parquet", "jsonl")  # = show.prepared_folder.FORMATS, spelt out to keep --help light


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, the tokenizer, how to encode, and where and how to write."""
    p.add_argument("data", help="a .json/.jsonl/.parquet/.csv file, a folder of them, a Hugging Face dataset name, "
                                "or a training config (.yaml): the training rows `instructune train` prepares from it")
    p.add_argument("--tokenizer", help="a Hub id, a local folder or a .gguf file (with a config: its tokenizer "
                                       "or model unless given)")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (new, or empty)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="hf",
                   help="hf: a datasets folder (default); parquet: DIR/data.parquet; jsonl: DIR/data.jsonl")
    add_encoding_arguments(p)
    p.add_argument("--num-proc", type=int, default=None, help="worker processes for encoding (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preparation cache")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds something")


def run(args: argparse.Namespace) -> int:
    """Prepare `args.data`, print the summary, and write the rows and the summary to `--output`."""
    from rich.console import Console

    from instructune.api import save_prepared
    from instructune.commands.inspect import is_config, refuse_encoding_flags
    from instructune.data.prepare import PreparedDataset
    from instructune.data.templates import check_template_choice
    from instructune.show.prepared_folder import check_output_folder
    from instructune.show.summary import render_summary
    from instructune.train.training_data import rows_of_config

    options = encoding_options(args)
    check_output_folder(args.output, overwrite=args.overwrite)  # before any work
    check_template_choice(options.template)  # a broken template file: one line, before anything is loaded
    if is_config(args.data):  # a mixture's training rows carry their `source` column
        refuse_encoding_flags(args, options)
        found = rows_of_config(args.data, args.tokenizer, cache=not args.no_cache)
        args.tokenizer = found.tokenizer_name
        prepared = PreparedDataset(rows=found.rows, report=found.report, template=found.template,
                                   tokenizer=found.tokenizer, options=found.options)
    else:
        prepared, tokenizer = encode_data_argument(args, options)
    console = Console(highlight=False)
    if is_config(args.data) and found.mixture is not None:
        from instructune.show.mixture import sources_tables
        from instructune.show.summary import render_table

        for table in sources_tables(found.mixture.sources):
            console.print(render_table(table))
            console.print()
    console.print(render_summary(prepared.report))
    console.print()
    out = save_prepared(prepared, args.output, fmt=args.output_format, overwrite=args.overwrite, source=args.data,
                        tokenizer=args.tokenizer)
    how = {"hf": f"datasets.load_from_disk({str(out)!r})", "parquet": f"{out / 'data.parquet'}",
           "jsonl": f"{out / 'data.jsonl'}"}[args.output_format]
    console.print(f"wrote {len(prepared.rows):,} row(s) to {out} ({how}); the summary is in "
                  f"{out / 'preparation.json'}", markup=False, soft_wrap=True)
    return 0
