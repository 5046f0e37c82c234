"""Training precision (`precision: auto | fp32 | bf16-mixed | bf16-true`): weight dtype, autocast, optimizer.

- **fp32**: weights, gradients, optimizer state and every computation in fp32. The only sensible
  choice on a CPU without fast bf16 (most of them: bf16 matmuls run ~100x slower than fp32 here).
- **bf16-mixed**: fp32 master weights, gradients and AdamW state; forward and backward under
  `torch.autocast(dtype=bfloat16)` (matrix products in bf16, reductions and norms in fp32); the
  cross-entropy in fp32 (the LM head's products in bf16, its logits and log-softmax in fp32). What
  transformers' Trainer (`bf16=True`) and Lightning (`bf16-mixed`) do. Updates are applied to fp32
  weights, so none is lost.
- **bf16-true**: weights and gradients in bf16, AdamW moments in fp32, and every update applied with
  Kahan compensation (`compensated_adamw.CompensatedAdamW`), so updates far below bf16's resolution
  still add up. Least memory and no casts; gradient accumulation over micro-batches adds in bf16.
- **auto**: fp32 on CPU, bf16-mixed on CUDA.

Plain bf16 (bf16 weights with an uncompensated AdamW, what this project's CUDA path did before) is
not offered: at fine-tuning learning rates most updates round away (bench/precision_bench.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class StateBytes:
    """Bytes per trainable parameter that training keeps for the whole run (activations not included)."""

    weight: int
    gradient: int
    optimizer: int
    """AdamW's two moments, plus the compensation buffer in bf16-true."""

    @property
    def total(self) -> int:
        """Weight + gradient + optimizer state."""
        return self.weight + self.gradient + self.optimizer


STATE_BYTES = {
    "fp32": StateBytes(weight=4, gradient=4, optimizer=8),
    "bf16-mixed": StateBytes(weight=4, gradient=4, optimizer=8),
    "bf16-true": StateBytes(weight=2, gradient=2, optimizer=8 + 2),
}
"""Memory per trainable parameter in each mode (docs/precision.md). bf16-mixed saves on activations,
not on state: under autocast most saved activations are bf16, plus a bf16 copy of each weight per
forward (autocast's cast cache, freed after the forward)."""


def resolve_precision(setting: str, device: torch.device) -> str:
    """The mode a run trains in: `auto` becomes fp32 on CPU and bf16-mixed on CUDA."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return setting


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype the weights are loaded and trained in: bf16 for bf16-true, fp32 otherwise."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast(precision: str, device: torch.device):
    """The context forward passes run in: bf16 autocast for bf16-mixed, nothing otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on `device_type` right now, or None when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
