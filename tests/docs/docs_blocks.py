"""The fenced code blocks of a documentation page, in order, for the tests that run or parse them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    """One fenced block: its language (`python`, `bash`, `text`, or empty), text and first line (1-based)."""

    language: str
    text: str
    line: int


def code_blocks(markdown: str) -> list[Block]:
    """Every fenced block of `markdown`, indentation (inside a list item) removed."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        blocks.append(Block(language, "\n".join(body) + "\n", start))
        i += 1
    return blocks


def doc_pages() -> list[Path]:
    """Every Markdown page of the site."""
    return sorted(DOCS.rglob("*.md"))
