"""`instructune compare [CONFIG.yaml] [key=value ...]`: run the masked-vs-unmasked study, write its report."""

from __future__ import annotations

import time

from instructune.errors import UserError
from instructune.openmp import bound_openmp_spinning


def run_compare(arguments: list[str], *, heldout: str | None = None, max_new_tokens: int = 32,
                examples: int = 8, console=None) -> int:
    """Run the command; returns the exit status."""
    bound_openmp_spinning()  # before torch loads OpenMP (this module imports nothing that loads it)
    from rich.console import Console

    from instructune.compare import CompareOptions, compare_config, run_study
    from instructune.compare_report import require_matplotlib, write_report
    from instructune.train_command import split_arguments

    if max_new_tokens < 1 or examples < 0:
        raise UserError("--max-new-tokens must be at least 1 and --examples at least 0")
    console = console or Console(highlight=False, soft_wrap=True)
    config_path, overrides = split_arguments(arguments)
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
