"""`instructune train [CONFIG.yaml] [key=value ...]`: a configured run, or the default job without a config."""

from __future__ import annotations

import argparse
from pathlib import Path

from instructune.commands.arguments import add_config_arguments, config_keys_text, split_config_arguments
from instructune.train.openmp import bound_openmp_spinning

HELP = "fine-tune a model (with no config: the default job)"
EXAMPLES = (
    'instructune train',
    'instructune train configs/default.yaml epochs=2 lr=5e-5',
    'instructune train my.yaml resume=true',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
DESCRIPTION = ("Fine-tune with instruction masking. With no CONFIG, run the default job: SmolLM2-135M-Instruct "
               "on the packaged question-answer set, with before/after answers to held-out questions.")


def epilog() -> str:
    """Every configuration key, its default and meaning."""
    return config_keys_text()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The config file and its overrides."""
    add_config_arguments(p, "lr=1e-4 or lora.r=8")


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    bound_openmp_spinning()  # before torch loads OpenMP; see instructune.train.openmp
    config_path, overrides = split_config_arguments(args.arguments)
    if config_path is None:
        from instructune.study.default_job import run_default_job

        return run_default_job(overrides)

    from rich.console import Console

    from instructune.api import train
    from instructune.train.config import load_config
    from instructune.train.distributed import is_main_process

    # The overrides are text (`lr=1e-4`), read as the YAML file's values are, with its errors; the run is the API's.
    config = load_config(config_path, overrides)
    result = train(config, name=Path(config_path).stem)
    console = Console(highlight=False, soft_wrap=True, quiet=not is_main_process())  # under torchrun: rank 0
    if result.last_loss is not None:
        console.print(f"final training loss {result.last_loss:.4f}", markup=False)
    if result.eval_metrics:
        console.print(f"eval loss {result.eval_metrics['loss']:.4f}, "
                      f"next-token accuracy {result.eval_metrics['accuracy']:.1%}", markup=False)
    console.print(f"model saved in {result.checkpoint}", markup=False)
    if result.merged is not None:
        console.print(f"merged model saved in {result.merged}", markup=False)
    return 0
