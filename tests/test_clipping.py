"""Clipping inside the fused AdamW step equals clip_grad_norm_ followed by the step."""

from __future__ import annotations

import pytest
import torch

from instructune.optim import build_optimizer
from instructune.testing import make_tiny_model
from instructune.train import _clip_in_optimizer


def _model_with_grads():
    model = make_tiny_model(64)
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * 0.05
    return model


@pytest.mark.parametrize("max_norm", [0.5, 1e6, None])
def test_clipping_in_the_optimizer_matches_clip_grad_norm(max_norm):
    reference, model = _model_with_grads(), _model_with_grads()
    ref_opt, opt = build_optimizer(reference, 1e-2, 0.1), build_optimizer(model, 1e-2, 0.1)
    assert opt.defaults.get("fused")  # the CPU build of torch has the fused kernel
    params = [p for p in model.parameters()]
    ref_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), max_norm or float("inf"))
    norm = _clip_in_optimizer(opt, params, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    if max_norm == 0.5:
        assert float(norm) > 0.5  # clipping scales the gradients: ours start unscaled, the reference's scaled
    ref_opt.step()
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        # Adam's first step nearly cancels a scale; its first moment is the clipped gradient x (1 - beta1).
        torch.testing.assert_close(opt.state[a]["exp_avg"], ref_opt.state[b]["exp_avg"], atol=1e-9, rtol=1e-6)
