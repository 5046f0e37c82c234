"""docs/configuration.md is generated from the TrainConfig dataclass and never drifts from it."""

from __future__ import annotations

import importlib.util

from docs_blocks import DOCS, ROOT


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_what_the_code_generates():
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == _generator().render(), (
        "docs/configuration.md is out of date with src/instructune/train/config.py: "
        "run `.venv/bin/python scripts/config_reference.py`")


def test_the_page_names_every_key_with_its_default_and_meaning():
    from instructune.train.config import FIELD_NAMES, TrainConfig, field_docs

    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(FIELD_NAMES)
    defaults = TrainConfig().to_dict()
    assert f"| `{defaults['epochs']}` |" in rows["epochs"] and "| `null` |" in rows["lr"]
    assert all(field_docs()[name].split()[0] in rows[name] for name in FIELD_NAMES)
