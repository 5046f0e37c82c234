"""Activation checkpointing switched on for one forward pass at a time.

`gradient_checkpointing: true` recomputes every forward's activations in backward. With a token
budget (`max_tokens_per_forward`) only a forward holding a row longer than the budget needs it: its
saved activations shrink to each layer's input (layers x tokens x hidden) plus one layer's internals
at a time during backward, so a 16k-token row fits where its full activations would not, and every
other forward runs at full speed. The decoder layers of transformers (`GradientCheckpointingLayer`)
read their `gradient_checkpointing` flag at each call; this sets it for the forward and restores it
afterwards (the recomputation in backward calls the layer's own forward, not the flag check).
Non-reentrant checkpointing: no input needs `requires_grad` (LoRA, frozen embeddings), and it
restores the RNG state, so dropout draws the same masks when recomputing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch.utils.checkpoint
from torch import nn


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers that can recompute their activations (transformers' checkpointing layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@contextlib.contextmanager
def recomputing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open (and `enabled`), every decoder layer of `model` checkpoints: forwards save only layer inputs."""
    layers = checkpointing_layers(model) if enabled else []
    before = [(layer.gradient_checkpointing, getattr(layer, "_gradient_checkpointing_func", None)) for layer in layers]
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    try:
        for layer, (_, func) in zip(layers, before):
            layer._gradient_checkpointing_func = func or checkpoint
            layer.gradient_checkpointing = True
        yield
    finally:
        for layer, (flag, func) in zip(layers, before):
            layer.gradient_checkpointing = flag
            if func is None:
                del layer._gradient_checkpointing_func
