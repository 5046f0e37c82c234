"""The documentation site builds with no warning, and its links stay inside it.

`mkdocs build --strict` fails on any warning: a link to a missing page or to a heading that does not
exist, a page left out of the navigation, a docstring the API reference cannot read. The build needs no
network (mkdocs.yml fetches no fonts, inventories or plugins)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from docs_blocks import DOCS, ROOT, doc_pages

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _missing_site_tools() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or (
                "." in module and importlib.util.find_spec(module) is None):
            return module
    return None


@pytest.mark.skipif(_missing_site_tools() is not None,
                    reason="the documentation tools are not installed (`bash scripts/setup.sh test` installs "
                           "mkdocs, mkdocs-material and mkdocstrings)")
def test_the_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    import instructune

    for name in instructune.__all__:  # the reference documents every public name
        if name not in ("IGNORE_INDEX", "__version__"):
            assert f'id="{name}"' in api or f'.{name}"' in api, f"the API reference does not document {name}"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in doc_pages():
        assert f": {page.relative_to(DOCS).as_posix()}" in nav, f"{page.relative_to(ROOT)} is not in mkdocs.yml's nav"


def test_links_between_pages_are_relative_and_stay_inside_the_site():
    checked = 0
    for page in doc_pages():
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            for target in LINK.findall(line):
                where = f"{page.relative_to(ROOT)} line {number}"
                if re.match(r"^[a-z]+://", target) or target.startswith(("#", "mailto:")):
                    continue
                path = target.split("#")[0]
                assert not path.startswith("/"), f"{where}: an absolute link {target!r} (use a relative one)"
                resolved = (page.parent / path).resolve()
                assert resolved.is_relative_to(DOCS.resolve()), (
                    f"{where}: {target!r} points outside docs/, which the site does not hold; name the file "
                    "as a path instead")
                assert resolved.exists(), f"{where}: {target!r} does not exist"
                checked += 1
    assert checked > 50


def test_readme_links_into_the_docs_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in LINK.findall(readme):
        if not re.match(r"^[a-z]+://", target) and not target.startswith("#"):
            assert (ROOT / target.split("#")[0]).exists(), f"README.md links to {target!r}, which does not exist"
