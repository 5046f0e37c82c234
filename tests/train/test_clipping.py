"""Clipping inside the fused AdamW step equals clip_grad_norm_ followed by the step."""

from __future__ import annotations

import pytest
import torch

from instructune.testing import make_tiny_model
from instructune.train.loop import _clip
from instructune.train.optim import build_optimizer, grad_norm


def _model_with_grads():
    model = make_tiny_model(64)
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * 0.05
    return model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.5, 1e6, None])
def test_clipping_matches_clip_grad_norm(max_norm, fused):
    reference, model = _model_with_grads(), _model_with_grads()
    ref_opt, opt = build_optimizer(reference, 1e-2, 0.1), build_optimizer(model, 1e-2, 0.1)
    assert opt.defaults.get("fused")  # the CPU build of torch has the fused kernel
    if not fused:  # the foreach optimizer: the gradients are scaled in place instead
        opt = torch.optim.AdamW(opt.param_groups, foreach=True)
    params = [p for p in model.parameters()]
    ref_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm or float("inf"))
    norm = _clip(opt, params, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    if max_norm == 0.5:
        assert float(norm) > 0.5  # clipping scales the gradients: ours start unscaled, the reference's scaled
    ref_opt.step()
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        # Adam's first step nearly cancels a scale; its first moment is the clipped gradient x (1 - beta1).
        torch.testing.assert_close(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"], atol=1e-9, rtol=1e-6)


# The tolerance comes from fp32 rounding, not from one machine's result. Each 2^20-element chunk is one
# BLAS dot product; even if it kept a single fp32 accumulator, its rounding errors (unit roundoff
# u = 2^-24 ~ 6e-8 per addition) add up like a random walk to ~sqrt(2^20) * u = 6e-5 relative, and the
# square root halves that: ~3e-5. The chunks add up in fp64, which adds nothing at this scale. Measured:
# ~1e-7 on an AVX-512 Xeon, 3.7e-6 on an AVX2 EPYC (whose sdot keeps fewer partial sums). 1e-4 holds on
# any x86 machine and still fails torch's own fp32 norm, which is ~1.7e-3 off here.
NORM_RTOL = 1e-4


def test_grad_norm_is_accurate_for_vocabulary_sized_gradients():
    # 3e7 elements: torch's fp32 CPU norm is ~1.7e-3 off here (one running fp32 sum per thread).
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(30_000_000, generator=gen)
    small = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    grads = [big.view(3000, 10_000), *small, None]
    reference = torch.cat([g.reshape(-1).double() for g in grads if g is not None]).norm()
    norm = grad_norm(grads)
    assert norm.dtype == torch.float32
    assert abs(float(norm) / float(reference) - 1) < NORM_RTOL


def test_grad_norm_of_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(40, 30, generator=gen)
    torch.testing.assert_close(grad_norm([matrix.t()]), matrix.double().norm().float())
    assert float(grad_norm([None])) == 0.0
