"""The package layout shows the pipeline: each stage imports only from the stages before it, and no
module imports itself back through others (no import cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "instructune"

STAGES = ("data", "show", "model", "train", "use", "study", "api", "commands", "cli")
"""The pipeline in order; a module may import from its own stage and the ones before it."""
BASE = ("instructune", "instructune.errors", "instructune.cache", "instructune.ranges", "instructune.testing",
        "instructune.disk")
"""Importable from anywhere: the package root (IGNORE_INDEX), the user-error type, where the cache lives,
the ranges of numeric settings, the test helpers, full disks and damaged files told clearly."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The instructune modules `path` imports (every import, or only those run at import time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("instructune")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("instructune"):
            found.add(node.module)
            # `from instructune.data import encode` imports a module, not a name.
            found |= {f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / node.module.replace(".", "/")
                                                                        / f"{a.name}.py").exists()}
    return found


def _stage(module: str) -> str | None:
    if module == "instructune.__main__":  # `python -m instructune` is the command line
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_has_every_stage():
    assert {_stage(m) for m in MODULES} >= set(STAGES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_stage_imports_only_from_earlier_stages(module):
    own = _stage(module)
    if own is None:
        assert module in BASE, f"{module} belongs to no stage: put it in one of {STAGES}"
        return
    for imported in _imports(MODULES[module], top_level_only=False):
        if imported in BASE:
            continue
        other = _stage(imported)
        assert other is not None, f"{module} imports {imported}, which belongs to no stage"
        assert STAGES.index(other) <= STAGES.index(own), \
            f"{module} ({own}) imports {imported} ({other}), a later stage of the pipeline"


def test_no_import_cycle_at_import_time():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [module, nxt]))
            if nxt not in state:
                visit(nxt, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
