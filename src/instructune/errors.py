"""The one exception type that means "the user gave us something wrong".

The command line catches `UserError` and prints its message without a traceback; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (data, configuration, flags) with a message that says how to fix it."""


def where(source: str | None = None, row: int | None = None, line: int | None = None,
          field: str | None = None) -> str:
    """Format a location such as `data.jsonl, line 12, field 'messages[1].role'` for error messages."""
    parts = []
    if source is not None:
        parts.append(str(source))
    if line is not None:
        parts.append(f"line {line}")
    elif row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)
