"""Training precision: fp32, bf16-mixed and bf16-true on tiny models; the compensated AdamW's mechanism.

Tolerances between two bf16 computations of one gradient (1x8 against 8x1 micro-batches, packed against
padded) come from bf16's unit roundoff u = 2^-8, not from a measured run. A gradient of an L-layer
decoder passes through n = 2·(6·L + 1) bf16 roundings, forward and backward: per layer the q/k/v
projections, attention, o_proj, the gate/up projections, act(gate)·up and down_proj, plus the LM head;
in bf16-true also one per accumulated micro-batch (gradients add in bf16) and the rounding of the
weights. Rounding errors of independent operations add in quadrature: Higham & Mary's probabilistic
bound (SIAM J. Sci. Comput. 2019) puts one computation within λ·√n·u of the exact gradient, with λ = 4;
two computations then differ by at most √2·λ·√n·u, norm-wise relative. Each test also checks that a
real mistake (a lost row) breaks that bound, so it is tight enough to see one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil

import pytest
import torch

from instructune.errors import UserError
from instructune.train.compensated_adamw import CompensatedAdamW
from instructune.train.config import load_config
from instructune.train.loop import setup_run, train
from instructune.train.precision import PRECISIONS, STATE_BYTES, resolve_precision
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data

MODES = ["fp32", "bf16-mixed", "bf16-true"]
U = {"fp32": 2.0 ** -24, "bf16-mixed": 2.0 ** -8, "bf16-true": 2.0 ** -8}
"""Unit roundoff of the format the products round to in each mode."""
ROUNDINGS_PER_LAYER = 6
LAMBDA = 4.0


def roundings(layers: int, mode: str, micro_batches: int = 1) -> int:
    """Roundings on a gradient's path, forward and backward (see the module docstring)."""
    n = 2 * (ROUNDINGS_PER_LAYER * layers + 1)
    return n + micro_batches + 1 if mode == "bf16-true" else n


def tolerance(layers: int, mode: str, micro_batches: int = 1) -> float:
    """Norm-wise relative distance two computations of one gradient may have in `mode`."""
    return math.sqrt(2) * LAMBDA * math.sqrt(roundings(layers, mode, micro_batches)) * U[mode]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together, in fp64."""
    assert a.keys() == b.keys()
    num = sum(float((a[n].double() - b[n].double()).square().sum()) for n in b)
    return math.sqrt(num / sum(float(b[n].double().square().sum()) for n in b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def config_for(tiny, output_dir, **extra):
    return load_config(overrides=quick_settings(*tiny, output_dir, **extra))


def _gradients(run, groups):
    """(loss, gradients) of one step's accumulation over `groups` of rows, the weights untouched."""
    from instructune.train.loop import _collate, accumulate_gradients
    from instructune.train.step_plan import step_denominator

    batches = [_collate(run, group) for group in groups]
    run.model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(run, batches, step_denominator(batches, run.config.loss_normalization))
    grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)
    return float(loss), grads


# ---------------------------------------------------------------------------------------------------
# The setting

def test_precision_key_resolves_by_device_and_replaces_dtype(tiny, tmp_path):
    from instructune.train.config import CHOICES

    assert CHOICES["precision"] == PRECISIONS
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16-mixed"
    with pytest.raises(UserError, match="'precision': expected one of auto, fp32, bf16-mixed, bf16-true"):
        load_config(overrides=["precision=bf16"])
    with pytest.raises(UserError, match="'dtype' is now 'precision'"):
        load_config(overrides=["dtype=bfloat16"])
    run = setup_run(config_for(tiny, tmp_path / "run"))
    assert run.config.precision == "fp32"  # auto, resolved on this CPU and saved so
    assert load_config(tmp_path / "run" / "config.yaml").precision == "fp32"


def test_memory_per_parameter_is_what_the_state_takes(tiny):
    from instructune.model.load import load_model
    from instructune.train.memory_budget import state_bytes_to_come
    from instructune.train.optim import build_optimizer

    for mode, dtype in (("fp32", torch.float32), ("bf16-true", torch.bfloat16)):
        model = load_model(str(tiny[0]), dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, 1e-3, 0.0)
        model(torch.tensor([[3, 10, 20]])).logits.float().sum().backward()
        optimizer.step()
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        held += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        held += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                    if t.dim() > 0)
        assert held == params * STATE_BYTES[mode].total
        assert state_bytes_to_come(model) == held  # the memory budget counts the same bytes


# ---------------------------------------------------------------------------------------------------
# The compensated AdamW

def test_compensated_adamw_is_torch_adamw_on_fp32_parameters():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    a = CompensatedAdamW(groups(ours), lr=1e-2)
    b = torch.optim.AdamW(groups(theirs), lr=1e-2, foreach=False, fused=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))  # the same update, term for term


def test_updates_below_half_an_ulp_are_lost_without_compensation_and_kept_with_it():
    # A weight of 1 in bf16 has neighbours 2^-8 below and 2^-7 above: an update of 1e-4 (Adam's step is lr
    # for a steady gradient) is below half of either gap, so round-to-nearest gives the weight back.
    steps, lr = 200, 1e-4
    start = torch.ones(64)
    fp32 = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.to(torch.bfloat16))
    kahan = torch.nn.Parameter(start.to(torch.bfloat16))
    optimizers = [torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0, foreach=False),
                  torch.optim.AdamW([plain], lr=lr, weight_decay=0.0, foreach=False),
                  CompensatedAdamW([kahan], lr=lr)]
    for _ in range(steps):
        for param, optimizer in zip((fp32, plain, kahan), optimizers):
            param.grad = torch.ones_like(param)
            optimizer.step()
    fp32, plain, kahan = fp32.detach(), plain.detach(), kahan.detach()
    moved = float((start - fp32).max())
    assert math.isclose(moved, steps * lr, rel_tol=1e-3)  # fp32 takes every step: 0.02 in all
    assert torch.equal(plain.float(), start)  # plain bf16 AdamW: not one of 200 updates arrived
    # Compensated: the weight is within half an ulp of the fp32 weight, plus the compensation's own rounding
    # (at most u = 2^-8 of half an ulp per step): ulp(0.98) = 2^-8.
    ulp = 2.0 ** -8
    bound = ulp / 2 + steps * 2.0 ** -8 * ulp / 2
    assert float((kahan.float() - fp32).abs().max()) <= bound < moved / 2
    state = next(iter(optimizers[2].state.values()))
    total = kahan.float() + state["compensation"].float()  # weight + what it could not take yet
    assert float((total - fp32).abs().max()) <= steps * 2.0 ** -8 * ulp / 2


def test_optimizer_state_round_trip_keeps_the_moments_in_fp32(tmp_path):
    from instructune.train.checkpoint import load_optimizer_state

    param = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    optimizer = CompensatedAdamW([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    fresh = CompensatedAdamW([param], lr=1e-3)
    load_optimizer_state(tmp_path, fresh)
    saved, loaded = optimizer.state[param], fresh.state[param]
    assert loaded["exp_avg"].dtype == loaded["exp_avg_sq"].dtype == torch.float32
    assert loaded["compensation"].dtype == torch.bfloat16
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


# ---------------------------------------------------------------------------------------------------
# Each mode through the training loop

@pytest.mark.parametrize("mode", MODES)
def test_each_mode_computes_in_its_dtypes(tiny, tmp_path, mode):
    run = setup_run(config_for(tiny, tmp_path / "run", precision=mode))
    weights = {p.dtype for p in run.model.parameters()}
    assert weights == {torch.bfloat16 if mode == "bf16-true" else torch.float32}
    assert isinstance(run.optimizer, CompensatedAdamW) == (mode == "bf16-true")
    seen = []
    hook = run.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        loss, grads = _gradients(run, [[0, 1, 2]])
    finally:
        hook.remove()
    assert seen == [torch.float32 if mode == "fp32" else torch.bfloat16]  # the products
    assert {g.dtype for g in grads.values()} == weights  # gradients in the weights' dtype
    assert math.isfinite(loss)


@pytest.mark.parametrize("mode", MODES)
def test_one_batch_of_8_equals_8_accumulated_batches_of_1_in_each_mode(tiny, tmp_path, mode):
    run = setup_run(config_for(tiny, tmp_path / "run", precision=mode))
    layers = run.model.config.num_hidden_layers
    rows = list(range(1, 9))
    loss_1x8, grads_1x8 = _gradients(run, [rows])
    loss_8x1, grads_8x1 = _gradients(run, [[i] for i in rows])
    _, lost_row = _gradients(run, [[i] for i in rows[:-1]])
    bound = tolerance(layers, mode, micro_batches=8)
    # The loss: fp32 sums of fp32 cross-entropies of logits computed through the same roundings, forward only.
    assert abs(loss_1x8 - loss_8x1) <= bound * abs(loss_1x8)
    assert relative_distance(grads_8x1, grads_1x8) <= bound
    assert relative_distance(lost_row, grads_1x8) > bound


@pytest.mark.parametrize("mode", MODES)
def test_packed_and_padded_rows_give_the_same_gradients_in_each_mode(tiny, tmp_path, mode):
    padded = setup_run(config_for(tiny, tmp_path / "padded", precision=mode, padding_free=False))
    packed = setup_run(config_for(tiny, tmp_path / "packed", precision=mode, packing=True, max_length=128))
    groups = [[0, 1, 2, 3, 4, 5, 6, 7]]
    loss_padded, grads_padded = _gradients(padded, groups)
    loss_packed, grads_packed = _gradients(packed, groups)
    _, lost_row = _gradients(packed, [groups[0][:-1]])
    bound = tolerance(padded.model.config.num_hidden_layers, mode)
    assert abs(loss_packed - loss_padded) <= bound * abs(loss_padded)
    assert relative_distance(grads_packed, grads_padded) <= bound
    assert relative_distance(lost_row, grads_padded) > bound


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_gradient_checkpointing_changes_no_gradient_in_each_mode(tiny, tmp_path, mode):
    # The recomputation runs under the autocast state of its forward: the very same products, bitwise.
    plain = setup_run(config_for(tiny, tmp_path / "plain", precision=mode))
    checkpointed = setup_run(config_for(tiny, tmp_path / "checkpointed", precision=mode, gradient_checkpointing=True))
    loss, grads = _gradients(plain, [[1, 2, 3, 4], [5, 6]])
    loss_checkpointed, grads_checkpointed = _gradients(checkpointed, [[1, 2, 3, 4], [5, 6]])
    assert loss == loss_checkpointed
    assert all(torch.equal(grads[name], grads_checkpointed[name]) for name in grads)


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_bitwise_and_checkpoints_load_in_transformers_in_each_mode(tiny, tmp_path, mode, lora):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    extra = dict(precision=mode, max_steps=8, grad_accum=2, save_every=4, save_optimizer="all")
    if lora:
        extra["lora"] = {"r": 4}
    train(config_for(tiny, tmp_path / "reference", **extra))
    run = tmp_path / "run"
    train(config_for(tiny, run, **extra))
    shutil.rmtree(run / "checkpoint-8")  # as if killed after step 4's checkpoint
    train(dataclasses.replace(config_for(tiny, run, **extra), resume=True))
    assert train_records(run) == train_records(tmp_path / "reference")
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    final, expected = load_file(run / "checkpoint-8" / name), load_file(tmp_path / "reference" / "checkpoint-8" / name)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    if not lora:  # the weights are saved as trained: bf16 in bf16-true, fp32 master weights in bf16-mixed
        assert {t.dtype for t in final.values()} == {torch.bfloat16 if mode == "bf16-true" else torch.float32}
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint-8")
    with torch.no_grad():
        assert model(torch.tensor([[3, 10, 20, 30]])).logits.float().isfinite().all()


def test_fused_head_under_autocast_matches_the_autograd_head_under_autocast():
    from instructune.testing import make_tiny_model
    from instructune.train.loss import masked_lm_loss

    model = make_tiny_model(64, hidden_size=32)
    ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    results = []
    for per_row in (False, True):  # per_row takes the autograd head; the fused one otherwise
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = masked_lm_loss(model, batch, per_row=per_row)
        assert out.loss_sum.dtype == torch.float32  # the loss is fp32
        out.loss_sum.backward()
        results.append((float(out.loss_sum), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused), (autograd_loss, reference) = results
    bound = tolerance(model.config.num_hidden_layers, "bf16-mixed")
    assert abs(fused_loss - autograd_loss) <= bound * abs(autograd_loss)
    assert relative_distance(fused, reference) <= bound
    assert {g.dtype for g in fused.values()} == {torch.float32}


def test_flash_attention_only_on_cuda_in_a_bf16_mode_when_installed(monkeypatch):
    from instructune.train import setup

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    installed = importlib.util.find_spec
    monkeypatch.setattr(setup.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else installed(name, *a))
    assert setup.uses_flash_attention(cuda, "bf16-mixed") and setup.uses_flash_attention(cuda, "auto")
    assert setup.uses_flash_attention(cuda, "bf16-true")
    assert not setup.uses_flash_attention(cuda, "fp32")  # its kernels take no fp32: SDPA then
    assert not setup.uses_flash_attention(cpu, "bf16-mixed")
    monkeypatch.setattr(setup.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else installed(name, *a))
    assert not setup.uses_flash_attention(cuda, "bf16-mixed")
