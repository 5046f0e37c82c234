"""How rows are read and encoded, as one frozen, checked object (`EncodingOptions`).

The configuration (`TrainConfig.encoding`), the command line (`commands.arguments.encoding_options`),
`prepare_dataset`, `ConversationEncoder` and evaluation all take this one object, and the allowed
values of each setting are defined here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from instructune.data.formats import normalize_format_name
from instructune.errors import UserError

TRAIN_ON = ("assistant", "last", "all")
"""Which tokens are trained: every assistant response, the final one, or every token."""
TRUNCATION = ("keep_response", "keep_start", "drop")
"""What happens to a row longer than `max_length` (see `instructune.data.truncate`)."""
ON_BAD_ROW = ("error", "skip")
"""Whether a malformed row stops the run or is skipped and counted."""
HISTORY = ("auto", "expand", "drop")
"""Templates that rewrite earlier turns: one row per turn when needed (auto), always (expand), or drop the row."""
REASONING = ("train", "mask")
"""Whether the reasoning of a trained turn (`reasoning_content`, inline <think>) is trained or only context."""
TRAIN_ON_EOS = ("turn", "last", "all", "none")
"""Which closing tokens are trained: each trained turn's, the last trained turn's, every turn's, or none."""
SYSTEM = ("keep", "merge", "drop")
"""The system prompt: rendered as given, folded into the first user turn, or left out."""
MIN_MAX_LENGTH = 2
"""The shortest useful row: one token to predict from, one to predict."""

_CHOICES = {"train_on": TRAIN_ON, "truncation": TRUNCATION, "on_bad_row": ON_BAD_ROW, "history": HISTORY,
            "reasoning": REASONING, "train_on_eos": TRAIN_ON_EOS, "system_role": SYSTEM}

# Settings that act only through what prepare hashes anyway, so they stay out of `row_settings`:
# `template` is a name or path whose *text* is what renders (prepare hashes the resolved text, which
# also sees an edited .jinja file); `data_format` and `on_bad_row` decide which conversations are
# read, and the conversations themselves (with their row indices) are hashed.
_HASHED_THROUGH_INPUTS = ("template", "data_format", "on_bad_row")


class OptionError(UserError):
    """An encoding setting out of its range; `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class EncodingOptions:
    """Every setting that decides how a dataset's rows become encoded training rows."""

    template: str | None = None
    """Chat template: a built-in name (alpaca, chatml, plain), a .jinja file, or None: the tokenizer's."""
    data_format: str | None = None
    """Data format: alpaca, prompt_completion, messages, sharegpt, text; None: detected from the first row."""
    train_on: str = "assistant"
    """Which tokens are trained: assistant (every response), last (final response), all (every token)."""
    max_length: int | None = None
    """Longest row in tokens; longer rows follow `truncation`. None: no limit."""
    truncation: str = "keep_response"
    """keep_response (drop oldest turns, then cut the end), keep_start (cut the end) or drop (the row)."""
    on_bad_row: str = "error"
    """A malformed row stops the run (error) or is skipped and counted (skip)."""
    history: str = "auto"
    """Templates that rewrite earlier turns: auto (one row per turn when needed), expand (always), drop."""
    reasoning: str = "train"
    """Reasoning of a trained turn (reasoning_content or inline <think>): train it, or mask (context only)."""
    train_on_eos: str = "turn"
    """Closing tokens trained: turn (each trained turn's), last (the final trained turn's), all, none."""
    system_role: str = "keep"
    """System messages: keep, merge (fold them into the first user turn) or drop."""
    template_vars: tuple = ()
    """Extra variables for the template, as a mapping (stored as sorted (name, JSON) pairs)."""

    def __post_init__(self):
        object.__setattr__(self, "template_vars", _frozen_vars(self.template_vars))
        if self.template is not None and not isinstance(self.template, str):
            raise OptionError("template", f"must be a string or null, got {self.template!r}")
        if self.data_format is not None:
            try:
                normalize_format_name(str(self.data_format))
            except UserError as error:
                raise OptionError("data_format", f"must be a known format; {error}") from None
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise OptionError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        if self.max_length is not None:
            if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
                raise OptionError("max_length", f"must be an integer or null, got {self.max_length!r}")
            if self.max_length < MIN_MAX_LENGTH:
                raise OptionError("max_length",
                                  f"must be at least {MIN_MAX_LENGTH} (or null), got {self.max_length}")

    def template_variables(self) -> dict[str, Any]:
        """`template_vars` as the mapping the template receives."""
        return {name: json.loads(value) for name, value in self.template_vars}

    def row_settings(self) -> dict[str, Any]:
        """The settings that shape the encoded rows of given conversations and template text (the cache key).

        Every field is in, except those that act only through the conversations and the template
        text, which the key hashes itself; a field added later is therefore in the key by default.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _HASHED_THROUGH_INPUTS}


def _frozen_vars(value) -> tuple:
    """A mapping of template variables as sorted (name, JSON text) pairs, so the options stay hashable."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as error:
            raise OptionError("template_vars", f"must be a JSON object, got {value!r}: {error}") from None
    if isinstance(value, Mapping):
        try:
            return tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in value.items()))
        except TypeError as error:
            raise OptionError("template_vars", f"must hold JSON values: {error}") from None
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return tuple(sorted(value))
    raise OptionError("template_vars", f"must be a mapping of names to values, got {value!r}")


DEFAULT_ENCODING = EncodingOptions()
"""The defaults: the tokenizer's own template, a detected format, assistant turns, no length limit."""
