"""The allowed ranges of the numeric settings that the command line and a config both take.

A command checks its flags with `commands.arguments.check_arguments` and the configuration its keys in
`train.config`, both through `setting_problem`, so `--num-proc 0` and `num_proc: 0` are refused by the
same rule; only the way the setting is named (`--num-proc`, `run.yaml, line 3: 'num_proc'`) differs.
"""

from __future__ import annotations

from typing import Any

SETTING_RANGES: dict[str, tuple[Any, str]] = {
    "num_proc": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "seed": (lambda v: v >= 0, "0 or more"),
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, "0 (greedy) or more"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "0 or more"),
    "examples": (lambda v: v >= 0, "0 or more"),
    "max_tokens_per_forward": (lambda v: v >= 0, "0 (no limit) or more"),
    "instruction_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_queue": (lambda v: v >= 0, "0 (refuse what cannot start at once) or more"),
    "request_timeout": (lambda v: v >= 0, "0 (no limit) or more seconds"),
}
"""Setting name -> (the test a value must pass, the range in words). None (the default) always passes."""


def setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for setting `name` (`must be at least 1, got 0`), or None."""
    if value is None or name not in SETTING_RANGES:
        return None
    test, words = SETTING_RANGES[name]
    return None if test(value) else f"must be {words}, got {value}"
