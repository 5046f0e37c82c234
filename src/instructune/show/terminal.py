"""Drawing rows in the terminal with rich: trained tokens set apart, token boundaries visible.

With colour, trained tokens are bold white on green and masked ones grey, each with alternating
background shades so the boundaries show. Trained runs are also wrapped in `⟦` … `⟧`, and without
colour (`NO_COLOR`, a pipe, a file) tokens are separated by `¦`, so the output reads the same as
plain text (see `instructune.show.tokens` for the whole convention).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.text import Text

from instructune.show.tokens import (
    EMPTY_PIECE,
    MARK_CLOSE,
    MARK_OPEN,
    NEWLINE,
    SEPARATOR,
    TAB,
    RowView,
    TokenView,
    visible,
)

# Two shades per kind: neighbouring tokens alternate between them, which draws the boundaries.
TRAINED_STYLES = ("bold bright_white on dark_green", "bold bright_white on green4")
MASKED_STYLES = ("grey66 on grey15", "grey66 on grey23")
SPECIAL_STYLE = "italic"
MARK_STYLE = "bright_green"  # not bold: some monospace fonts lack a bold ⟦ ⟧
SEPARATOR_STYLE = "dim"


def is_plain(console: Console) -> bool:
    """True when the console shows no colour, so boundaries need separators instead of shading."""
    return console.no_color or console.color_system is None


def _token_style(token: TokenView, index: int) -> str:
    if token.background is not None:
        style = f"{_readable_on(token.background)} on {token.background}"
        style = f"bold {style}" if token.trained else style
    else:
        style = (TRAINED_STYLES if token.trained else MASKED_STYLES)[index % 2]
    return f"{SPECIAL_STYLE} {style}" if token.special else style


def _readable_on(background: str) -> str:
    """Black or white text, whichever reads better on the `#rrggbb` background."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def render_tokens(tokens: Sequence[TokenView], *, plain: bool) -> Text:
    """The tokens as one rich `Text`: trained runs in `⟦` `⟧`, boundaries as shading or `¦` when `plain`."""
    text = Text()
    inside = False
    for index, token in enumerate(tokens):
        if token.trained != inside:
            text.append(MARK_OPEN if token.trained else MARK_CLOSE, style=MARK_STYLE)
            inside = token.trained
        elif plain and index > 0:
            # Also after a line break: a token may go on past its newline ("\n  " in code), so only
            # a sign can tell where it ends.
            text.append(SEPARATOR, style=SEPARATOR_STYLE)
        text.append(visible(token.text), style=_token_style(token, index))
    if inside:
        text.append(MARK_CLOSE, style=MARK_STYLE)
    return text


def render_row(view: RowView, *, plain: bool) -> Text:
    """A header line (`row 12 · 57 tokens · 20 trained · truncated`) followed by the row's tokens."""
    header = Text(view.header(), style="bold")
    if view.truncated:
        start = header.plain.index("truncated")
        header.stylize("yellow", start, start + len("truncated"))
    tokens = render_tokens(view.tokens, plain=plain)
    if tokens.plain.endswith("\n"):
        tokens.right_crop(1)  # the row's last newline is already shown as `↵`; the print adds its own
    return Text("\n").join([header, tokens])


def legend(*, plain: bool) -> Text:
    """One line that explains the markers and the visible whitespace."""
    text = Text("legend: ")
    text.append(MARK_OPEN, style=MARK_STYLE)
    text.append("trained", style=TRAINED_STYLES[0])
    text.append(MARK_CLOSE, style=MARK_STYLE)
    text.append("  ")
    text.append("masked", style=MASKED_STYLES[0])
    boundary = f"{SEPARATOR} between tokens" if plain else "alternating shades mark token boundaries"
    text.append(f"  {boundary}  {NEWLINE} newline  {TAB} tab  {EMPTY_PIECE} token with no text of its own"
                " (part of a split character)", style="dim")
    return text


def print_rows(console: Console, views: Iterable[RowView]) -> None:
    """Print the legend, then each row with its header, separated by blank lines (nothing for no rows)."""
    views = list(views)
    if not views:
        return
    plain = is_plain(console)
    # Rich would re-wrap long rows at the console width; in a pipe or file, extra line breaks would
    # look like the row's own, so there the lines are left as they are.
    soft_wrap = not console.is_terminal
    console.print(legend(plain=plain), soft_wrap=soft_wrap)
    for view in views:
        console.print()
        console.print(render_row(view, plain=plain), soft_wrap=soft_wrap)
