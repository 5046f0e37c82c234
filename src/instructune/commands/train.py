"""`instructune train [CONFIG.yaml] [key=value ...]`: a configured run, or the default job without a config."""

from __future__ import annotations

from pathlib import Path

from instructune.errors import UserError
from instructune.train.openmp import bound_openmp_spinning


def split_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, key=value overrides) from the command's positional arguments."""
    config_path = None
    if arguments and "=" not in arguments[0]:
        config_path, arguments = arguments[0], arguments[1:]
    for text in arguments:
        if "=" not in text:
            raise UserError(f"command line: expected key=value after the config file, got {text!r}")
    return config_path, list(arguments)


def run_train(arguments: list[str]) -> int:
    """Run the command; returns the exit status."""
    bound_openmp_spinning()  # before torch loads OpenMP; see instructune.train.openmp
    config_path, overrides = split_arguments(arguments)
    if config_path is None:
        from instructune.study.default_job import run_default_job

        return run_default_job(overrides)

    from rich.console import Console

    from instructune.train.config import load_config
    from instructune.train.distributed import is_main_process
    from instructune.train.loop import train

    config = load_config(config_path, overrides)
    console = Console(highlight=False, soft_wrap=True, quiet=not is_main_process())  # under torchrun: rank 0
    result = train(config, name=Path(config_path).stem, console=console)
    if result.last_loss is not None:
        console.print(f"final training loss {result.last_loss:.4f}", markup=False)
    if result.eval_metrics:
        console.print(f"eval loss {result.eval_metrics['loss']:.4f}, "
                      f"next-token accuracy {result.eval_metrics['accuracy']:.1%}", markup=False)
    console.print(f"model saved in {result.checkpoint}", markup=False)
    if result.merged is not None:
        console.print(f"merged model saved in {result.merged}", markup=False)
    return 0
