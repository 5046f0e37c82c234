"""The CUDA path: precision modes, fused AdamW, padding-free attention and the memory budget on a GPU.

Every test here is marked `cuda` and skipped, with the reason, without a CUDA GPU (tests/conftest.py);
`bench/gpu_check.sh` runs them on one. Tolerances are those of tests/train/test_precision.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_precision import _gradients, relative_distance, tolerance

from instructune.train.config import load_config
from instructune.train.loop import setup_run, train
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def config_for(tiny, output_dir, **extra):
    return load_config(overrides=quick_settings(*tiny, output_dir, **extra))


def test_auto_is_bf16_mixed_on_cuda_with_fused_adamw_and_the_gpu_memory_budget(tiny, tmp_path):
    run = setup_run(config_for(tiny, tmp_path / "run", device="cuda"))
    assert run.device.type == "cuda" and run.config.precision == "bf16-mixed"
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}  # fp32 master weights
    assert run.optimizer.defaults.get("fused")  # torch's fused AdamW kernel on CUDA
    free, _ = torch.cuda.mem_get_info()
    assert run.plan.tokens_per_forward is not None and run.plan.tokens_per_forward <= free  # from the GPU's memory


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_a_cuda_step_has_the_gradients_of_the_cpu_step(tiny, tmp_path, mode):
    cpu = setup_run(config_for(tiny, tmp_path / "cpu", precision="fp32", device="cpu"))
    gpu = setup_run(config_for(tiny, tmp_path / "gpu", precision=mode, device="cuda"))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    loss_cpu, grads_cpu = _gradients(cpu, groups)
    loss_gpu, grads_gpu = _gradients(gpu, groups)
    # bf16 on the GPU against fp32 on the CPU: within the bound of two computations (the fp32 one is all but exact).
    bound = tolerance(cpu.model.config.num_hidden_layers, mode, micro_batches=2)
    assert abs(loss_gpu - loss_cpu) <= bound * abs(loss_cpu)
    assert relative_distance({n: g.float().cpu() for n, g in grads_gpu.items()}, grads_cpu) <= bound


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed", "bf16-true"])
def test_padding_free_rows_on_cuda_equal_padded_rows(tiny, tmp_path, mode):
    flat = setup_run(config_for(tiny, tmp_path / "flat", precision=mode, device="cuda"))
    padded = setup_run(config_for(tiny, tmp_path / "padded", precision=mode, device="cuda", padding_free=False))
    groups = [[0, 1, 2, 3, 4, 5, 6, 7]]
    loss_flat, grads_flat = _gradients(flat, groups)
    loss_padded, grads_padded = _gradients(padded, groups)
    bound = tolerance(flat.model.config.num_hidden_layers, mode)
    assert math.isclose(loss_flat, loss_padded, rel_tol=bound)
    assert relative_distance(grads_flat, grads_padded) <= bound


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_a_cuda_run_resumes_bitwise(tiny, tmp_path, mode):
    import shutil

    extra = dict(precision=mode, device="cuda", max_steps=8, save_every=4, save_optimizer="all")
    train(config_for(tiny, tmp_path / "reference", **extra))
    run = tmp_path / "run"
    train(config_for(tiny, run, **extra))
    shutil.rmtree(run / "checkpoint-8")
    train(config_for(tiny, run, resume=True, **extra))
    assert train_records(run) == train_records(tmp_path / "reference")
