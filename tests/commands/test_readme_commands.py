"""The command examples of README.md and of every documentation page (docs/**/*.md) hold: each
`instructune ...` line parses with the real parser, and every configuration key it sets (`key=value`), or
that the prose names as an override, is a real key.

Commands are read from the ```bash blocks: `\\` continuations are joined, a `# comment` ends a
line, `a && b` and `echo ... | instructune ...` are split, and `python -m instructune` / `torchrun ...
-m instructune` / `.venv/bin/instructune` count as `instructune`. Parsing is argparse's alone (no
file needs to exist); the overrides of `train` and `compare` also go through `load_config`, which
checks each key and the type of its value.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from instructune.cli import build_parser
from instructune.errors import UserError
from instructune.model.lora import LORA_SETTINGS
from instructune.train.config import FIELD_NAMES, load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").rglob("*.md")))
"""What a user reads: the README and the documentation site's pages."""
MIN_COMMANDS = 10
"""Fewer means the extraction broke, not that README lost its examples: then this test fails."""
MIN_DOCS_COMMANDS = 30
"""The docs have a page per command, each with examples; fewer means the extraction broke."""
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_]+)?)=(.*)$", re.S)
NOT_CONFIG = {"key", "weights_only", "bf16"}
"""Backticked `name=value` in the prose that are not configuration overrides (`bf16=True` is transformers'
TrainingArguments)."""


@dataclass
class Example:
    line: int
    """The line number (1-based) where the command starts."""
    text: str
    argv: list[str]
    page: str = "README.md"
    """The file it is in, relative to the repository."""

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def bash_lines(readme: str) -> list[tuple[int, str]]:
    """The logical lines of README's ```bash blocks, continuations joined, with their first line number."""
    lines, block, pending, start = [], False, "", 0
    for number, line in enumerate(readme.splitlines(), start=1):
        if line.strip().startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def extract_commands(readme: str) -> list[Example]:
    """Every `instructune ...` command of README's bash blocks, as the argv after the program name."""
    examples = []
    for number, text in bash_lines(readme):
        words = shlex.split(text, comments=True)
        # Split `a && b`, `a | b` and `a ; b` into commands; keep the ones that run instructune.
        commands, current = [], []
        for word in words:
            if word in ("&&", "||", "|", ";"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
        for command in commands:
            start = program_end(command)
            if start is not None:
                examples.append(Example(number, " ".join(text.split()), command[start:]))
    return examples


def program_end(words: list[str]) -> int | None:
    """The index after `instructune` (or `.venv/bin/instructune`, `-m instructune`) in a command's words."""
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] == "instructune" and (i == 0 or words[i - 1] == "-m" or "/" in word):
            return i + 1
    return None


def overrides_of(example: Example) -> list[str]:
    """The `key=value` arguments of a train/compare example."""
    if not example.argv or example.argv[0] not in ("train", "compare"):
        return []
    return [word for word in example.argv[1:] if OVERRIDE.match(word)]


def _check_key(key: str, where: str) -> None:
    name, _, sub = key.partition(".")
    assert name in FIELD_NAMES, f"{where}: '{key}' is not a configuration key"
    if sub:
        assert name == "lora" and sub in LORA_SETTINGS, f"{where}: '{key}' is not a configuration key"


def page_examples(path: Path) -> list[Example]:
    """The commands of one page, each knowing its page."""
    found = extract_commands(path.read_text(encoding="utf-8"))
    for example in found:
        example.page = str(path.relative_to(ROOT))
    return found


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [example for page in PAGES for example in page_examples(page)]


def test_the_extraction_finds_the_commands(examples):
    in_readme = [e for e in examples if e.page == "README.md"]
    assert len(in_readme) >= MIN_COMMANDS, f"only {len(in_readme)} instructune commands found in README.md"
    in_docs = [e for e in examples if e.page != "README.md"]
    assert len(in_docs) >= MIN_DOCS_COMMANDS, f"only {len(in_docs)} instructune commands found in docs/"
    from instructune.cli import COMMANDS

    assert {e.argv[0] for e in in_docs if e.argv} == set(COMMANDS), "every command has an example in docs/"
    assert {e.argv[0] for e in in_readme if e.argv} >= {"train"}


def test_the_extraction_itself():
    readme = ("text\n```bash\necho \"hi\" | instructune generate - --model m   # a comment\n"
              "torchrun --nproc-per-node 2 \\\n  -m instructune train a.yaml lr=1e-4\n"
              "bash setup.sh && .venv/bin/instructune train\nls instructune-data/\n```\n"
              "```\ninstructune not-bash\n```\n")
    found = extract_commands(readme)
    assert [(e.line, e.argv) for e in found] == [
        (3, ["generate", "-", "--model", "m"]), (4, ["train", "a.yaml", "lr=1e-4"]), (6, ["train"])]
    assert overrides_of(found[1]) == ["lr=1e-4"]


def test_every_readme_command_parses(examples):
    parser = build_parser()
    for example in examples:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(example.argv)
        except SystemExit:
            pytest.fail(f"{example.where}: `{example.text}` does not parse: "
                        f"{stderr.getvalue().strip().splitlines()[-1:]}")


def test_every_override_in_a_readme_command_is_a_valid_config_key(examples):
    checked = 0
    for example in examples:
        overrides = overrides_of(example)
        if not overrides:
            continue
        where = f"{example.where} (`{example.text}`)"
        for text in overrides:
            _check_key(OVERRIDE.match(text).group(1), where)
        try:
            load_config(overrides=overrides)
        except UserError as error:
            pytest.fail(f"{where}: {error}")
        checked += len(overrides)
    assert checked >= 3


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_override_named_in_the_prose_is_a_config_key(page):
    named = 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for span in re.findall(r"`([^`]+)`", line):
            for word in span.split():
                match = OVERRIDE.match(word)
                if match and match.group(1) not in NOT_CONFIG:
                    _check_key(match.group(1), f"{page.relative_to(ROOT)} line {number} (`{span}`)")
                    named += 1
    if page == README:
        assert named >= 3
