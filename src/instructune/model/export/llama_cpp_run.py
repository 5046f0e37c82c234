"""Running an exported GGUF file in llama.cpp (through llama-cpp-python) to check it against the HF model.

Greedy decoding is done here token by token from llama.cpp's own logits (argmax, no sampler), so a
difference from the Hugging Face model's greedy answer can only come from the file's weights,
tokenizer metadata or stop tokens, not from sampling settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from instructune.errors import UserError


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike[str], *, n_ctx: int = 512, threads: int | None = None,
              f32_cache: bool = True) -> Iterator:
    """A `llama_cpp.Llama` for the file that keeps every position's logits, closed on exit.

    `f32_cache` keeps the attention cache in fp32 (llama.cpp's default is fp16), so an f32 export is
    compared with the HF model at fp32 precision throughout.
    """
    try:
        import llama_cpp
    except ImportError:
        raise UserError("checking a GGUF file needs llama-cpp-python: pip install llama-cpp-python") from None
    kwargs = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    try:
        llm = llama_cpp.Llama(str(Path(path)), n_ctx=n_ctx, logits_all=True, verbose=False,
                              n_threads=threads or max(1, len(os.sched_getaffinity(0))), **kwargs)
    except ValueError as error:
        raise UserError(f"llama.cpp cannot load {path}: {error}") from None
    try:
        yield llm
    finally:
        llm.close()


def prompt_logits(llm, ids: list[int]):
    """llama.cpp's logits (a numpy array, one row per position) for the token ids `ids`."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[:len(ids)].copy()


def is_end_of_generation(llm, token: int) -> bool:
    """Whether llama.cpp stops generating at `token` (EOS, EOT or another end-of-generation token)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


def greedy_ids(llm, prompt: list[int], *, max_new_tokens: int = 64) -> tuple[list[int], int | None]:
    """llama.cpp's greedy continuation of `prompt`: (the new ids before the stop token, the stop token or None)."""
    llm.reset()
    llm.eval(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if is_end_of_generation(llm, token):
            return new, token
        new.append(token)
        llm.eval([token])
    return new, None
