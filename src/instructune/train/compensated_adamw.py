"""AdamW for bf16 weights that keeps every update: Kahan-compensated parameter updates.

bf16 has 8 significant bits: a weight w moves only if its update is at least half a unit in the last
place, |Δ| >= 2^-9·|w| (round to nearest). At fine-tuning learning rates (1e-5 to 2e-5) an Adam update is
about lr in size, so a weight above ~0.005 in magnitude, most of them, rounds every update away: plain
bf16 AdamW silently trains far less than the same run in fp32 (bench/precision_bench.py measures it).

Kahan summation keeps what rounding drops. Per parameter a bf16 buffer `compensation` holds the part of
the updates that the bf16 weight could not take yet; each step adds the new update to it, applies
what the weight can represent, and keeps the rest:

    y = update + compensation                        (fp32)
    w_new = bf16(w + y)                              (round to nearest)
    compensation = bf16(y - (w_new - w))             (w_new - w is exact in fp32)

So the weight plus its compensation follow the fp32 trajectory to within the compensation's own
rounding (2^-9 of a quantity below half an ulp of w), and an update of any size adds up over steps.
The moments (exp_avg, exp_avg_sq) stay fp32: in bf16, `exp_avg_sq * 0.999` would round back to itself
(0.001 < 2^-9), so the second moment could never decay. State per trainable bf16 parameter: 2 bytes
of compensation + 8 bytes of moments (docs/precision.md has the whole table).

Written here rather than taken from a library: torchao's bf16 AdamW (`torchao.optim._AdamW`) is private,
keeps its moments in the parameter dtype, rounds stochastically (the run then depends on random draws)
and compiles a kernel per parameter shape with torch.compile (14 s for the first shape on this 2-core
CPU); torch-optimi's Kahan AdamW also keeps bf16 moments. The update itself is `torch.optim.AdamW`'s,
term for term (tested against it in fp32).

fp32 parameters in the same optimizer (LoRA adapters, which peft keeps in fp32 over a bf16 base) are
updated without compensation, exactly as above with `compensation = 0`.
"""

from __future__ import annotations

import math

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes that get a compensation buffer."""


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's formulation) with fp32 moments and Kahan-compensated updates
    of bf16/fp16 parameters; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            if param.dtype in LOW_PRECISION:
                state["compensation"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("CompensatedAdamW does not take sparse gradients")
                state = self._state(param)
                state["step"] += 1
                _adamw_update(param, param.grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a saved state, keeping the moments in fp32.

        `torch.optim.Optimizer.load_state_dict` casts every floating-point state tensor to its parameter's
        dtype (bf16 here), which would round the fp32 moments; they are put back from the saved tensors.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            param = params[int(index)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in values:
                    self.state[param][key] = values[key].to(device=param.device, dtype=torch.float32)


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's single-tensor update in fp32, applied with compensation to a low-precision weight."""
    step = float(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    grad = grad.to(torch.float32)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    compensation = state.get("compensation")
    if compensation is None:  # an fp32 parameter: torch's update, in place
        param.mul_(1 - lr * weight_decay)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return
    weight = param.to(torch.float32)
    # The whole step as one fp32 increment: decay of the old weight, the Adam step, what earlier steps left.
    increment = torch.addcdiv(compensation.to(torch.float32), exp_avg, denom, value=-lr / bias_correction1)
    if weight_decay:
        increment.add_(weight, alpha=-lr * weight_decay)
    param.copy_(weight + increment)  # rounds to the nearest bf16
    # What the weight took is exact in fp32 (two nearby bf16 values); the rest waits in the compensation.
    compensation.copy_(increment.sub_(param.to(torch.float32) - weight))
