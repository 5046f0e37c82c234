"""instructune: instruction tuning of causal language models with exact instruction masking."""

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""The label of a token that is read but never scored (Hugging Face / PyTorch convention)."""
