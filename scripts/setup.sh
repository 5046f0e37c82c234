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
# llama-cpp-python (the default model's package needs it; GGUF export is checked in it) is compiled on
# install. Compiled for the CPU at hand it uses AMX tile instructions on Xeons that have them, which some
# virtual machines do not enable: the first matrix product then dies with SIGILL, taking the whole
# process (and a test run) with it. So it is built for AVX2, which every x86-64 machine we run on has,
# once, without pip's cache of an earlier native build.
if [ "$(uname -m)" = "x86_64" ] && ! .venv/bin/python -c "
import sys, llama_cpp
sys.exit('AMX' in llama_cpp.llama_print_system_info().decode())" >/dev/null 2>&1; then
    echo "building llama-cpp-python for AVX2 (a few minutes, once) ..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        .venv/bin/pip install --quiet --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps \
        "llama-cpp-python==0.3.36"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
