"""A self-contained HTML page of rows and the summary: inline CSS, no scripts, nothing fetched.

Each token is a `<span>` whose `title` (shown on hover) is `id 1234 · label 1234 · assistant` or
`id 3 · label -100 (masked) · user`. Trained tokens are green, masked ones grey, neighbours alternate
shades, and trained runs carry the same `⟦` … `⟧` markers as the terminal, so copied text keeps them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from html import escape

from instructune.data.encoded import PreparationReport
from instructune.show.jsonl import atomic_writer
from instructune.show.summary import SummaryTable, summary_tables
from instructune.show.tokens import (
    EMPTY_PIECE,
    MARK_CLOSE,
    MARK_OPEN,
    NEWLINE,
    TAB,
    RowView,
    TokenView,
    visible,
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem;
       color: #222; background: #fff; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } .sub { color: #666; margin-top: 0; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .4rem; } h3 { font-size: .95rem; margin: 1.2rem 0 .3rem; }
.legend { font-size: .9rem; color: #444; }
.trunc { color: #a15c00; font-weight: 600; }
pre.tokens { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9rem;
             white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.75; margin: 0;
             background: #fafafa; border: 1px solid #ddd; border-radius: 4px; padding: .6rem .8rem; }
.t { border-radius: 2px; cursor: default; }
.m { color: #555; background: #ececec; } .m.o { background: #dadada; }
.tr { color: #0d3b0d; background: #b5e3b5; font-weight: 600; } .tr.o { background: #93d193; }
.sp { font-style: italic; color: #7b2d8e; } .tr.sp { color: #2f5b10; }
.t:hover { outline: 2px solid #1a66d2; outline-offset: -1px; }
.mk { color: #2e7d32; font-weight: 700; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .15rem 1rem .15rem 0; text-align: left; vertical-align: top; }
th { border-bottom: 1px solid #ccc; } td.n, th.n { text-align: right; }
td.ind { padding-left: 1.2rem; }
td.bar { font-family: ui-monospace, Menlo, Consolas, monospace; color: #2e7d32; }
"""


def token_spans(tokens: Sequence[TokenView]) -> str:
    """The tokens as `<span>`s with hover titles, trained runs between `⟦` `⟧` marker spans."""
    parts = []
    inside = False
    for index, token in enumerate(tokens):
        if token.trained != inside:
            marker = MARK_OPEN if token.trained else MARK_CLOSE
            parts.append(f'<span class="mk" aria-hidden="true">{marker}</span>')
            inside = token.trained
        classes = ["t", "tr" if token.trained else "m"]
        if index % 2:
            classes.append("o")
        if token.special:
            classes.append("sp")
        style = f' style="background:{token.background}"' if token.background else ""
        parts.append(f'<span class="{" ".join(classes)}"{style} title="{escape(token.describe())}">'
                     f"{escape(visible(token.text))}</span>")
    if inside:
        parts.append(f'<span class="mk" aria-hidden="true">{MARK_CLOSE}</span>')
    return "".join(parts)


def _row_section(view: RowView) -> str:
    header = escape(view.header())
    if view.truncated:
        header = header.replace("truncated", '<span class="trunc">truncated</span>', 1)
    return f'<section class="row"><h2>{header}</h2>\n<pre class="tokens">{token_spans(view.tokens)}</pre></section>'


def summary_html(report: PreparationReport) -> str:
    """The same tables as the terminal summary, as HTML."""
    return "\n".join(_table_html(table) for table in summary_tables(report))


def _table_html(table: SummaryTable) -> str:
    numeric = table.numeric_columns()
    lines = [f"<h3>{escape(table.title)}</h3>", "<table>"]
    if table.header:
        cells = "".join(f'<th{" class=n" if numeric[i] else ""}>{escape(name)}</th>'
                        for i, name in enumerate(table.header))
        lines.append(f"<thead><tr>{cells}</tr></thead>")
    lines.append("<tbody>")
    for row in table.rows:
        lines.append("<tr>" + "".join(_cell_html(cell, numeric[i]) for i, cell in enumerate(row)) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _cell_html(cell: str, numeric: bool) -> str:
    if numeric:
        return f"<td class=n>{escape(cell)}</td>"
    if cell.startswith("█"):
        return f"<td class=bar>{escape(cell)}</td>"
    if cell.startswith("  "):  # a sub-item (a drop reason under "dropped"): HTML would swallow the spaces
        return f"<td class=ind>{escape(cell.strip())}</td>"
    return f"<td>{escape(cell)}</td>"


def render_html(views: Sequence[RowView], report: PreparationReport | None = None, *,
                title: str = "instructune inspect", subtitle: str = "", tables: Sequence[SummaryTable] = ()) -> str:
    """The whole page: the legend, each row's tokens, `tables` (a mixture's sources) and the summary when a
    report is given."""
    legend = (f'<p class="legend"><span class="mk">{MARK_OPEN}</span><span class="t tr">trained</span>'
              f'<span class="mk">{MARK_CLOSE}</span> <span class="t m">masked</span> · hover a token for '
              f"its id, label and role · {NEWLINE} newline · {TAB} tab · {EMPTY_PIECE} token with no text of "
              "its own (part of a split character)</p>")
    body = [f"<h1>{escape(title)}</h1>"]
    if subtitle:
        body.append(f'<p class="sub">{escape(subtitle)}</p>')
    body.append(legend)
    body += [_row_section(view) for view in views]
    body += [_table_html(table) for table in tables]
    if report is not None:
        body += ["<h2>Summary</h2>", summary_html(report)]
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_html(path: str | os.PathLike, views: Sequence[RowView], report: PreparationReport | None = None,
               *, title: str = "instructune inspect", subtitle: str = "", tables: Sequence[SummaryTable] = ()) -> None:
    """Write `render_html(...)` to `path`, atomically."""
    with atomic_writer(path) as file:
        file.write(render_html(views, report, title=title, subtitle=subtitle, tables=tables))
