"""The docs' promises hold: a training run writes exactly the files the "What a run writes" list names.

The list is parsed from the pages that hold it - docs/commands/train.md, and README.md while it still
has one - so renaming a file in the code (or in the docs) without the other fails here. Each top-level bullet names one entry of `output_dir` (its first backticked
name); the `checkpoint-<step>/` bullet also names the files of a checkpoint. A bullet that says
"when `module` is installed" is checked only when that module is; one that mentions `merge_lora` is
checked on a LoRA run with `merge_lora: true`; the checkpoint bullet's "(...; with LoRA the adapter
instead: ...)" separates the files of a full fine-tune from those of a LoRA run, and "the newest
checkpoint also holds ... `FILE`" names a file only the newest checkpoint has (`save_optimizer: last`).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from instructune.cli import main
from train_fixtures import quick_settings, write_tiny_model, write_toy_data

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRAIN_PAGE = ROOT / "docs" / "commands" / "train.md"
SECTION_START = "What a run writes to `output_dir`"
FILE_NAME = re.compile(r"^[\w.-]+\.(json|jsonl|safetensors|yaml|pt|jinja|md|txt|png|bin|model)$|^[A-Z]+$")
LORA_ALTERNATIVE = re.compile(r"\(([^()]*);\s*with LoRA[^:]*:([^()]*)\)")
CONDITION = re.compile(r"when `?([\w.]+)`? is installed")
NEWEST_ONLY = re.compile(r"the newest checkpoint also holds[^`]*`([^`]+)`")


@dataclass
class Entry:
    """One bullet of the list: an entry of `output_dir` and what it promises."""

    name: str
    text: str
    module: str | None = None
    """Checked only when this module is installed."""
    merged_run: bool = False
    """Only a LoRA run with `merge_lora: true` writes it."""
    files: set[str] = field(default_factory=set)
    """Files promised inside it, for both kinds of run."""
    full_files: set[str] = field(default_factory=set)
    lora_files: set[str] = field(default_factory=set)
    newest_only: set[str] = field(default_factory=set)
    """Files only the newest of several matching folders holds."""

    def pattern(self) -> re.Pattern:
        """`checkpoint-<step>/` matches `checkpoint-12`; other names match themselves."""
        return re.compile(re.escape(self.name.rstrip("/")).replace("<step>", r"\d+") + "$")


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _file_names(text: str) -> set[str]:
    return {token for token in _backticked(text) if FILE_NAME.match(token)}


def promised_entries(readme: str) -> list[Entry]:
    """The bullets under "What a run writes to `output_dir`", parsed; fails when there are none."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(SECTION_START)]
    assert len(starts) == 1, f"the page must have exactly one line starting with {SECTION_START!r}"
    bullets: list[str] = []
    for line in lines[starts[0] + 1:]:
        if not line.strip() and not bullets:
            continue  # Markdown wants a blank line before a list
        if line.startswith("- "):
            bullets.append(line[2:])
        elif line.startswith("  ") and bullets and line.strip():
            bullets[-1] += " " + line.strip()
        else:
            break
    assert bullets, f"no list of files after {SECTION_START!r} on the page"
    entries = []
    for text in bullets:
        names = _backticked(text)
        assert names, f"a bullet of the list names no file: {text[:80]!r}"
        entry = Entry(name=names[0], text=text)
        if condition := CONDITION.search(text):
            entry.module = condition.group(1)
        entry.merged_run = "merge_lora" in text
        if newest := NEWEST_ONLY.search(text):
            entry.newest_only = {newest.group(1)}
        if alternative := LORA_ALTERNATIVE.search(text):
            entry.full_files = _file_names(alternative.group(1))
            entry.lora_files = _file_names(alternative.group(2))
            text = text[:alternative.start()] + text[alternative.end():]
        entry.files = _file_names(text) - {entry.name}
        entries.append(entry)
    return entries


def promising_pages() -> list[Path]:
    """The pages that hold the list: the train command's page always, README.md while it has one."""
    pages = [TRAIN_PAGE]
    if SECTION_START in README.read_text(encoding="utf-8"):
        pages.append(README)
    return pages


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def _matches(entry: Entry, folder: Path) -> list[Path]:
    pattern = entry.pattern()
    return [path for path in folder.iterdir() if pattern.match(path.name)]


@pytest.mark.parametrize("page", promising_pages(), ids=lambda path: path.name)
def test_the_list_is_parsed_into_the_files_a_run_writes(page):
    entries = promised_entries(page.read_text(encoding="utf-8"))
    names = {entry.name for entry in entries}
    assert {"config.yaml", "metrics.jsonl", "checkpoint-<step>/"} <= names
    checkpoint = next(entry for entry in entries if entry.name == "checkpoint-<step>/")
    assert {"training_config.yaml", "trainer_state.json", "optimizer.pt", "COMPLETE"} <= checkpoint.files
    assert checkpoint.newest_only == {"optimizer.pt"}
    assert "model.safetensors" in checkpoint.full_files and "adapter_model.safetensors" in checkpoint.lora_files


def test_the_parse_fails_loudly_on_a_readme_without_the_list():
    with pytest.raises(AssertionError, match="exactly one line"):
        promised_entries("# instructune\n\nNothing about runs here.\n")
    with pytest.raises(AssertionError, match="no list of files"):
        promised_entries(f"{SECTION_START} (default `runs/x`):\n\nHow it trains:\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny full fine-tune and, when peft is installed, a tiny LoRA run with `merge_lora: true`."""
    root = tmp_path_factory.mktemp("readme_runs")
    model, data = write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")
    config = root / "run.yaml"
    config.write_text("", encoding="utf-8")
    patch = pytest.MonkeyPatch()
    patch.setenv("INSTRUCTUNE_CACHE", str(root / "cache"))
    try:
        # Two optimizer steps, a checkpoint after each (so `keep_last` keeps more than one).
        common = {"max_steps": 2, "save_every": 1, "eval_every": 0}
        if importlib.util.find_spec("tensorboard") is not None:  # README: `tensorboard/` comes with report_to
            common["report_to"] = "tensorboard"
        full = root / "full"
        assert main(["train", str(config), *quick_settings(model, data, full, **common)]) == 0
        lora = None
        if importlib.util.find_spec("peft") is not None:
            lora = root / "lora"
            settings = quick_settings(model, data, lora, lora={"r": 4}, merge_lora=True, **common)
            assert main(["train", str(config), *settings]) == 0
    finally:
        patch.undo()
    return full, lora


@pytest.mark.parametrize("page", promising_pages(), ids=lambda path: path.name)
def test_a_run_writes_every_file_the_docs_promise_and_nothing_else(runs, page):
    full, lora = runs
    entries = promised_entries(page.read_text(encoding="utf-8"))
    checked = 0
    for run, is_lora in ((full, False), (lora, True)):
        if run is None:
            continue
        for entry in entries:
            found = _matches(entry, run)
            if not _installed(entry.module) or (entry.merged_run and not is_lora):
                continue
            written = sorted(path.name for path in run.iterdir())
            assert found, f"{page.name} promises `{entry.name}` in output_dir, but the run wrote {written}"
            checked += 1
            expected = entry.files | (entry.lora_files if is_lora else entry.full_files)
            newest = max(found, key=lambda path: [int(n) for n in re.findall(r"\d+", path.name)])
            for folder in found:
                if expected:
                    written = {path.name for path in folder.iterdir()}
                    here = expected if folder == newest else expected - entry.newest_only
                    assert written == here, (
                        f"{folder.name}: {page.name} names {sorted(here)}, the run wrote {sorted(written)}")
        # The other way round: every entry the run wrote is one the page names.
        for path in run.iterdir():
            assert any(entry.pattern().match(path.name) for entry in entries), (
                f"the run wrote `{path.name}`, which {page.name}'s list of what a run writes does not name")
    assert checked >= 4


def test_what_users_read_never_points_outside_the_repository():
    readable = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(readable) > 1, "docs/ should hold the masking contract (docs/masking.md)"
    for path in readable:
        text = path.read_text(encoding="utf-8")
        for outside in ("../shared", "/shared/"):
            assert outside not in text, f"{path.relative_to(ROOT)} points to {outside!r}"


def test_no_code_test_or_benchmark_reads_outside_the_repository():
    # A user's clone has nothing beside it: data a test or benchmark needs ships in the repository.
    outside = re.compile(r"""\.\./shared(?![\w.])|parents?\[\d\]\.parent\s*/\s*["']shared|\.parent\s*/\s*["']shared["']""")
    files = [p for folder in ("src", "tests", "bench", "scripts", ".ci") for p in sorted((ROOT / folder).rglob("*"))
             if p.is_file() and p.suffix in (".py", ".sh", ".md", "") and "__pycache__" not in p.parts
             and p != Path(__file__).resolve()]  # this file names the pattern it looks for
    assert len(files) > 50
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not outside.search(text), f"{path.relative_to(ROOT)} reads a folder outside the repository"
