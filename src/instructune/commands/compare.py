"""`instructune compare [CONFIG.yaml] [key=value ...]`: run the masked-vs-unmasked study, write its report."""

from __future__ import annotations

import argparse
import time

from instructune.commands.arguments import add_config_arguments, config_keys_text, split_config_arguments
from instructune.train.openmp import bound_openmp_spinning

HELP = "train masked and unmasked runs side by side and write a report"
EXAMPLES = (
    'instructune compare',
    'instructune compare my.yaml epochs=2 output_dir=runs/my-compare --heldout questions.jsonl',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
DESCRIPTION = ("The masked-vs-unmasked study: two runs from the same weights, rows, order and seed, one with "
               "train_on=assistant and one with train_on=all, and a report folder (output_dir, default "
               "runs/compare) with report.md, summary.json and plots. With no CONFIG: the default job's model "
               "and data for one epoch. Overrides apply to both runs; train_on is set by the study.")


def epilog() -> str:
    """Every configuration key, its default and meaning."""
    return config_keys_text()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The config file and its overrides, and what the study generates and shows."""
    add_config_arguments(p, "lr=1e-4 or output_dir=runs/study")
    p.add_argument("--heldout", help="questions to answer before and after training (default: eval_data, else the eval split)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer (default 32)")
    p.add_argument("--examples", type=int, default=8, help="answers shown side by side in the report (default 8)")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    bound_openmp_spinning()  # before torch loads OpenMP (this module imports nothing that loads it)
    from rich.console import Console

    from instructune.study.compare import CompareOptions, compare_config, run_study
    from instructune.study.report import require_matplotlib, write_report

    heldout, max_new_tokens, examples = args.heldout, args.max_new_tokens, args.examples  # checked by cli.main
    console = Console(highlight=False, soft_wrap=True)
    config_path, overrides = split_config_arguments(args.arguments)
    config = compare_config(config_path, overrides)
    require_matplotlib()
    started = time.perf_counter()
    options = CompareOptions(heldout=heldout, max_new_tokens=max_new_tokens, examples=examples)
    summary = run_study(config, options, console)
    files = write_report(summary, config.output_dir)
    before, masked, unmasked = summary["before"], summary["runs"]["masked"], summary["runs"]["unmasked"]
    console.print(
        f"response loss {before['response_loss']:.3f} → masked {masked['final']['response_loss']:.3f}, unmasked "
        f"{unmasked['final']['response_loss']:.3f}; contains the answer {before['generation']['contains']:.0%} → "
        f"{masked['generation']['contains']:.0%} / {unmasked['generation']['contains']:.0%}; median step "
        f"{masked['compute']['median_step_s']:.2f} s / {unmasked['compute']['median_step_s']:.2f} s"
        + (f" (side by side: masked/unmasked = {summary['paired_timing']['median_ratio']:.2f})"
           if summary["paired_timing"] else ""), markup=False)
    console.print(f"report: {files[0]} (with {', '.join(f.name for f in files[1:])}); total time "
                  f"{time.perf_counter() - started:.0f} s", markup=False)
    return 0
