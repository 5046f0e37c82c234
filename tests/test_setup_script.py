"""`scripts/setup.sh test` says so when it installs Chromium with apt-get, and the README says it too.

The script runs for real on a copy, with stand-ins for `apt-get`, `id` and `python3` first on PATH, so
nothing is installed and the machine's own Chromium (if any) does not matter.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup.sh"
CHROMIUM = "/usr/bin/chromium"

STAND_INS = {
    # Root, so that the script may install system packages.
    "id": 'if [ "$1" = "-u" ]; then echo 0; else exec /usr/bin/id "$@"; fi\n',
    "apt-get": 'echo "$*" >> "$APT_LOG"\n',
    # `python3 -m venv .venv`: a venv whose python and pip succeed at everything.
    "python3": 'mkdir -p .venv/bin\nprintf "#!/bin/sh\\nexit 0\\n" > .venv/bin/python\n'
               'cp .venv/bin/python .venv/bin/pip\nchmod +x .venv/bin/python .venv/bin/pip\n',
}


def run_setup(tmp_path: Path, chromium: Path) -> tuple[str, str]:
    """Run a copy of setup.sh (`test`) that looks for Chromium at `chromium`; (stdout, apt-get calls)."""
    assert CHROMIUM in SCRIPT.read_text()
    copy = tmp_path / "repo" / "scripts" / "setup.sh"
    copy.parent.mkdir(parents=True)
    copy.write_text(SCRIPT.read_text().replace(CHROMIUM, str(chromium)))
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in STAND_INS.items():
        (shims / name).write_text("#!/bin/sh\n" + body)
        (shims / name).chmod(0o755)
    log = tmp_path / "apt.log"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "APT_LOG": str(log)}
    done = subprocess.run(["bash", str(copy), "test"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, log.read_text() if log.exists() else ""


def test_installing_chromium_prints_a_line(tmp_path):
    out, apt = run_setup(tmp_path, tmp_path / "no-chromium")
    assert "install -y -q chromium" in apt
    assert "installing Chromium with apt-get" in out


def test_nothing_is_said_or_installed_when_chromium_is_there(tmp_path):
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    out, apt = run_setup(tmp_path, chromium)
    assert apt == "" and "Chromium" not in out


def test_the_readme_says_the_test_setup_installs_chromium():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "installs Chromium" in readme and "apt-get" in readme
