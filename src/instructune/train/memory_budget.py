"""The automatic token budget of one forward pass (`max_tokens_per_forward: null`), from free memory.

Training memory is the model state (weights, gradients, AdamW's two moments: 16 bytes a trainable
fp32 parameter, 14 in bf16-true; docs/precision.md), which no split can shrink, plus the activations
saved for backward, which grow with the tokens of one forward pass. The rule:

    budget = (free memory - state still to be allocated) / 2 / activation bytes per token

Free memory is MemAvailable (CPU; shared by the ranks of one machine, so divided by the local rank
count) or the GPU's free memory, read once at setup; the half left over is for the allocator's
slack, the runtime, the head's chunks, evaluation and other processes. Activation bytes per token
are estimated from the model's shape (`activation_bytes_per_token`). The budget is at least
`MIN_TOKENS`: below that the products get too thin to be worth it, and a machine that tight needs an
explicit setting (or activation checkpointing) anyway.
"""

from __future__ import annotations

import os

import torch
from torch import nn

MIN_TOKENS = 512
"""The automatic budget never goes below this many tokens per forward."""


def activation_bytes_per_token(model: nn.Module, *, lean_layers: bool = True) -> int:
    """Estimated bytes a decoder saves for backward per token of a forward pass (all layers).

    Per layer and token a pre-norm decoder saves about 6 hidden-sized vectors (the residual input, the
    normed input, q, k/v, attention output, the second normed input) and 3 intermediate-sized ones
    (gate, up and the product fed to down_proj); without the lean norm/MLP backward (`fused_layers`)
    about 1.6x that. Measured on SmolLM2-135M in fp32 with the lean layers: 0.80 MB per token
    (bench/README.md); the estimate gives 0.97 MB, on the safe side.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    element = next(model.parameters()).element_size()
    per_layer = (6 * hidden + 3 * intermediate) * element
    total = config.num_hidden_layers * per_layer
    return int(total if lean_layers else total * 1.6)


def state_bytes_to_come(model: nn.Module) -> int:
    """Memory the model state still needs once the weights are loaded: per trainable parameter a gradient
    (the weight's dtype) and two fp32 AdamW moments, plus a compensation buffer for a bf16 weight
    (`compensated_adamw`), plus the weights themselves (they may still be mapped from the file)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for p in model.parameters():
        if p.requires_grad:
            compensation = p.element_size() if p.element_size() < 4 else 0
            state += p.numel() * (p.element_size() + 8 + compensation)
    return weights + state


def free_memory(device: torch.device) -> int:
    """Bytes this process may still use: the GPU's free memory, or MemAvailable on CPU shared by the
    ranks on this machine (`LOCAL_WORLD_SIZE`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _mem_available()
    return available // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Without /proc (not Linux): free physical pages, which leaves out reclaimable caches (on the safe side).
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_tokens_per_forward(model: nn.Module, device: torch.device, *, lean_layers: bool = True,
                            free: int | None = None) -> int:
    """The automatic `max_tokens_per_forward` (see the module docstring); `free` overrides the reading."""
    free = free_memory(device) if free is None else free
    spare = max(free - state_bytes_to_come(model), 0)
    return max(MIN_TOKENS, int(spare / 2 / activation_bytes_per_token(model, lean_layers=lean_layers)))


def resolve_tokens_per_forward(setting: int | None, model: nn.Module, device: torch.device, *,
                               lean_layers: bool, broadcast=lambda value: value) -> int | None:
    """The budget a run uses: `max_tokens_per_forward` as set (0: None, no limit), or the automatic one.

    Every rank must split alike, so rank 0's automatic budget is handed to all (`broadcast`).
    """
    if setting is not None:
        return setting or None
    return broadcast(auto_tokens_per_forward(model, device, lean_layers=lean_layers))
