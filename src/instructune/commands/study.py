"""`instructune study [CONFIG.yaml] [key=value ...]`: when does instruction masking help? A sweep and its report."""

from __future__ import annotations

import argparse
import time

from instructune.commands.arguments import add_config_arguments, config_keys_text, split_config_arguments
from instructune.train.openmp import bound_openmp_spinning

HELP = "sweep instruction weights x epochs x seeds from the same start and write a verdict report"
EXAMPLES = (
    'instructune study',
    'instructune study --weights 0,1 --seeds 42 --rows 8 epochs=2 output_dir=runs/small-study',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
DESCRIPTION = (
    "Trains one arm per (seed, instruction weight) from the same initial weights and rows, scores every arm "
    "after each epoch (response and instruction loss on held-out and training rows, greedy answers to held-out "
    "questions, tokens and time per step) and writes OUTPUT_DIR/report.html and report.md: loss curves, the "
    "generalisation gap against the weight, answers side by side, and a verdict on the three claims made for "
    "masking next to what the papers found. With no CONFIG: the shipped study (the default model, packaged "
    "rows, 3 epochs). Overrides apply to every arm.")


def epilog() -> str:
    """Every configuration key, its default and meaning."""
    return config_keys_text()


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The config and overrides, the sweep, the data regime and what is generated."""
    from instructune.study.regimes import REGIMES

    add_config_arguments(p, "lr=1e-4 epochs=4 output_dir=runs/my-study")
    p.add_argument("--weights", type=_floats, default=(0.0, 0.01, 0.1, 1.0),
                   help="instruction weights to sweep, in [0, 1], 0 included (default 0,0.01,0.1,1)")
    p.add_argument("--seeds", type=_ints, default=(42, 43),
                   help="seeds; each repeats the sweep, in its own row order (default 42,43)")
    p.add_argument("--regime", choices=tuple(REGIMES), default="long_instruction",
                   help="; ".join(f"{k}: {v}" for k, v in REGIMES.items()) + " (default long_instruction)")
    p.add_argument("--rows", type=int, default=16,
                   help="training rows (few rows: the few-examples condition); 0: every row the regime has (default 16)")
    p.add_argument("--heldout-rows", type=int, default=8, help="held-out rows scored and answered (default 8)")
    p.add_argument("--questions", type=int, default=6, help="held-out questions answered after each epoch (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest generated answer (default 16)")
    p.add_argument("--train-sample", type=int, default=8,
                   help="training rows scored after each epoch for the generalisation gap (default 8)")
    p.add_argument("--timing-pairs", type=int, default=2,
                   help="steps timed side by side with and without instruction labels; 0: none (default 2)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each arm's final checkpoint (by default they are deleted once answered)")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    bound_openmp_spinning()  # before torch loads OpenMP (this module imports nothing that loads it)
    from pathlib import Path

    from rich.console import Console

    from instructune.errors import UserError
    from instructune.study.regimes import build_regime
    from instructune.study.report import require_matplotlib
    from instructune.study.study_config import study_config
    from instructune.study.study_report import write_study_report
    from instructune.study.sweep import StudyOptions, check_weights, run_sweep, summarise

    for flag, value, least in (("--rows", args.rows, 0), ("--heldout-rows", args.heldout_rows, 1),
                               ("--questions", args.questions, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--train-sample", args.train_sample, 1), ("--timing-pairs", args.timing_pairs, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds must be distinct integers, 0 or more, got {','.join(map(str, args.seeds))}")
    weights = check_weights(args.weights)
    console = Console(highlight=False, soft_wrap=True)
    config_path, overrides = split_config_arguments(args.arguments)
    config = study_config(config_path, overrides, args.regime)
    require_matplotlib()
    started = time.perf_counter()
    output = Path(config.output_dir)
    if output.exists() and any(output.iterdir()) and not config.overwrite:
        raise UserError(f"{output} is not empty; choose another output_dir, or overwrite=true to start afresh")
    encoding = config.encoding
    regime = build_regime(args.regime, config.data, output / "data", heldout_source=config.eval_data,
                          rows=args.rows or None, heldout_rows=args.heldout_rows, data_format=encoding.data_format,
                          on_bad_row=encoding.on_bad_row)
    options = StudyOptions(weights=weights, seeds=args.seeds, questions=args.questions,
                           max_new_tokens=args.max_new_tokens, train_sample=args.train_sample,
                           timing_pairs=args.timing_pairs, keep_checkpoints=args.keep_checkpoints)
    swept = run_sweep(config, regime, options, output, console)
    summary = summarise(config, regime, options, swept)
    files = write_study_report(summary, output)
    for v in summary["verdicts"]:
        console.print(f"{v['claim']}: {v['verdict']} ({v['metric']}: mean {v['mean']:+.3f})", markup=False)
    console.print(f"report: {files[0]} (and {', '.join(f.name for f in files[1:])}); total time "
                  f"{time.perf_counter() - started:.0f} s", markup=False)
    return 0
