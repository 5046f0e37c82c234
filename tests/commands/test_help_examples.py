"""Every command's `--help` ends with example lines, and each of them is a command that parses."""

from __future__ import annotations

import contextlib
import io

import pytest
from test_readme_commands import extract_commands, overrides_of

from instructune.cli import COMMANDS, EXAMPLES, build_parser, command_module
from instructune.train.config import load_config


@pytest.mark.parametrize("name", COMMANDS)
def test_help_ends_with_examples_that_parse(name):
    module = command_module(name)
    assert module.EXAMPLES, f"instructune {name} has no example lines"
    parser = build_parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args([name, "--help"])
    shown = out.getvalue()
    assert "\nexamples:\n" in shown
    for line in module.EXAMPLES:
        assert f"  {line}\n" in shown, f"instructune {name} --help does not show {line!r} as written"
    examples = extract_commands("```bash\n" + "\n".join(module.EXAMPLES) + "\n```\n")
    assert [example.argv[0] for example in examples] == [name] * len(module.EXAMPLES)
    for example in examples:
        parser.parse_args(example.argv)  # exits (fails the test) on a line that does not parse
        if overrides_of(example):
            load_config(overrides=overrides_of(example))


def test_a_long_description_is_wrapped_and_the_examples_are_not(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    description = out.getvalue().split("\n\n")[1]
    assert max(len(line) for line in description.splitlines()) <= 60
    assert f"  {command_module('compare').EXAMPLES[1]}\n" in out.getvalue()


def test_the_top_level_help_ends_with_examples_that_parse():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert out.getvalue().rstrip().endswith(EXAMPLES)
    for example in extract_commands("```bash\n" + EXAMPLES.split("\n", 1)[1] + "\n```\n"):
        build_parser().parse_args(example.argv)
