"""Loading through transformers without its noise: log messages and progress bars off, errors on one line.

Both the loaders (`model.load`) and the GGUF conversion (`model.gguf`) call `from_pretrained`, so this
sits below both of them. Set `INSTRUCTUNE_VERBOSE=1` to see transformers' own log messages and progress
bars while loading.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_loading(gguf: bool = False) -> Iterator[None]:
    """Silence transformers' info/warning messages and progress bars while loading, unless verbose.

    `gguf=True` also silences the progress bar of transformers' GGUF reader.
    """
    if os.environ.get("INSTRUCTUNE_VERBOSE", "").strip().lower() not in ("", "0", "false", "no"):
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own plain tqdm bar, which transformers' switch above does not reach.
    gguf_utils = gguf_tqdm = None
    if gguf:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf_tqdm = getattr(gguf_utils, "tqdm", None)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def one_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (transformers' errors run to many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
