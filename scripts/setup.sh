#!/usr/bin/env bash
# Set up instructune in ./.venv on a fresh machine: `bash scripts/setup.sh` for the tool,
# `bash scripts/setup.sh test` for the tool plus what the test suite needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="lora,plot"
if [ "${1:-}" = "test" ]; then
    extras="test"
    # The chat page is tested in a real headless browser: Debian's Chromium (Playwright drives it;
    # its own browser download is not used). Installed when missing and the machine allows it.
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        # Said aloud: it changes the machine outside this folder, and takes a while.
        echo "installing Chromium with apt-get (system-wide, for the chat page's browser test) ..."
        apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || echo "note: could not install chromium; the browser test will be skipped"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch first, pinned: a range would let pip pick the newest CUDA build (several GB). On a machine
# with CUDA, this pin gives the CUDA build of the same version.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
