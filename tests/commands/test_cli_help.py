"""`instructune --help` speaks to the user: what the tool does and where to start, not how the code is laid out."""

from __future__ import annotations

import pytest

from instructune.cli import COMMANDS, main


def test_top_level_help_describes_the_tool_for_its_user(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "training only on the responses" in out and "`instructune train` with no arguments" in out
    assert "module" not in out  # the code's layout is the module docstring's business
    assert all(name in out for name in COMMANDS)
