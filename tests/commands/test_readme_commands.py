"""README.md's command examples hold: each `instructune ...` line parses with the real parser, and every
configuration key it sets (`key=value`), or that README's prose names as an override, is a real key.

Commands are read from README's ```bash blocks: `\\` continuations are joined, a `# comment` ends a
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
MIN_COMMANDS = 10
"""Fewer means the extraction broke, not that README lost its examples: then this test fails."""
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_]+)?)=(.*)$", re.S)
NOT_CONFIG = {"key", "weights_only"}
"""Backticked `name=value` in README's prose that are not configuration overrides."""


@dataclass
class Example:
    line: int
    """README's line number (1-based) where the command starts."""
    text: str
    argv: list[str]


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


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return extract_commands(README.read_text(encoding="utf-8"))


def test_the_extraction_finds_the_commands(examples):
    assert len(examples) >= MIN_COMMANDS, f"only {len(examples)} instructune commands found in README.md"
    assert {e.argv[0] for e in examples if e.argv} >= {"inspect", "train", "compare", "explain", "eval",
                                                       "generate", "chat"}


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
            pytest.fail(f"README.md line {example.line}: `{example.text}` does not parse: "
                        f"{stderr.getvalue().strip().splitlines()[-1:]}")


def test_every_override_in_a_readme_command_is_a_valid_config_key(examples):
    checked = 0
    for example in examples:
        overrides = overrides_of(example)
        if not overrides:
            continue
        where = f"README.md line {example.line} (`{example.text}`)"
        for text in overrides:
            _check_key(OVERRIDE.match(text).group(1), where)
        try:
            load_config(overrides=overrides)
        except UserError as error:
            pytest.fail(f"{where}: {error}")
        checked += len(overrides)
    assert checked >= 3


def test_every_override_named_in_readme_prose_is_a_config_key():
    readme = README.read_text(encoding="utf-8")
    named = 0
    for number, line in enumerate(readme.splitlines(), start=1):
        for span in re.findall(r"`([^`]+)`", line):
            for word in span.split():
                match = OVERRIDE.match(word)
                if match and match.group(1) not in NOT_CONFIG:
                    _check_key(match.group(1), f"README.md line {number} (`{span}`)")
                    named += 1
    assert named >= 3
