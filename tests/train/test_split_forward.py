"""Bounded activation memory: a micro-batch split into forward passes by a token budget trains exactly
the same step (loss and every gradient), and a row longer than the budget recomputes its activations.

Tolerances. Splitting changes only the order of additions (each forward's partial sums, and GEMM
blockings of other shapes), never what is added. The gradient comparisons run in float64, where a
value that goes through n roundings is off by at most n * 2**-53 relative to the magnitudes summed;
the model's chain is well under 10**4 operations deep, so 1e-11 x the sum of the rows' gradient
magnitudes bounds the difference with room to spare, while a real mistake (a row lost, counted twice,
or a wrong denominator) moves a value by a whole row's share, >= 1e-2 of it. The same step in float32
runs through the whole training loop and is held to the tolerance the distributed tests use. Where
the order of operations is unchanged (a budget that splits nothing, recomputation) equality is bitwise.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from instructune.data.encoded import EncodedRow
from instructune.train.config import load_config
from instructune.train.loop import _collate, accumulate_gradients, setup_run
from instructune.train.memory_budget import MIN_TOKENS, activation_bytes_per_token, auto_tokens_per_forward
from instructune.train.recompute import recomputing
from instructune.train.step_plan import StepPlan, forward_tokens, split_by_tokens, step_denominator
from train_fixtures import quick_settings, write_tiny_model, write_toy_data

LENGTHS = [5, 3, 8, 2, 9, 1]


# ---------------------------------------------------------------------------------------------------
# The split, a pure function

def test_split_keeps_order_and_fits_the_budget_counted_as_laid_out():
    rows = list(range(6))
    assert split_by_tokens(rows, LENGTHS, 10, padded=False) == [[0, 1], [2, 3], [4, 5]]  # 8, 10, 10 tokens
    # Padded, a forward costs rows x longest: [0, 1] is 2 x 5, [2, 3] would be 2 x 8.
    assert split_by_tokens(rows, LENGTHS, 10, padded=True) == [[0, 1], [2], [3], [4], [5]]
    # A row longer than the budget goes alone, whole.
    assert split_by_tokens(rows, LENGTHS, 4, padded=False) == [[0], [1], [2], [3], [4], [5]]
    assert split_by_tokens(rows, LENGTHS, None, padded=False) == [rows]
    assert split_by_tokens(rows, LENGTHS, 0, padded=True) == [rows]
    assert split_by_tokens([], LENGTHS, 4, padded=False) == [[]]
    assert forward_tokens([0, 2], LENGTHS, padded=True) == 16 and forward_tokens([0, 2], LENGTHS, padded=False) == 13


@pytest.mark.parametrize("padded", [False, True])
def test_split_invariants_on_random_batches(padded):
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 12))]
        rows = rng.sample(range(len(lengths)), len(lengths))
        budget = rng.randint(1, 120)
        groups = split_by_tokens(rows, lengths, budget, padded=padded)
        assert [i for g in groups for i in g] == rows  # every row once, in order
        assert all(forward_tokens(g, lengths, padded=padded) <= budget or len(g) == 1 for g in groups)
        # Greedy: no group could have taken the next group's first row.
        for g, following in zip(groups, groups[1:]):
            assert forward_tokens(g + following[:1], lengths, padded=padded) > budget


def _config(tmp_path, **extra):
    model, data = write_tiny_model(tmp_path / "model"), write_toy_data(tmp_path / "data.jsonl")
    return load_config(None, quick_settings(model, data, tmp_path / "out", **extra))


def test_plan_splits_each_share_and_every_rank_runs_as_many_forwards(tmp_path):
    rng = random.Random(1)
    lengths = [rng.randint(2, 60) for _ in range(37)]
    config = dataclasses.replace(_config(tmp_path, batch_size=5, grad_accum=2, epochs=1), max_steps=None)
    whole = StepPlan(lengths, config)
    for world in (1, 2, 3):
        ranks = [StepPlan(lengths, config, world_size=world, rank=r) for r in range(world)]
        for plan in ranks:
            plan.tokens_per_forward = 50
        for step in range(whole.total_steps()):
            _, batches = whole.step(step)
            planned = [plan.step_forwards(step) for plan in ranks]
            assert len({len(forwards) for _, forwards, _ in planned}) == 1  # the same count on every rank
            assert len({tuple(recompute) for _, _, recompute in planned}) == 1  # the same forwards recompute
            # All ranks' forwards together hold exactly the step's rows.
            assert sorted(i for _, forwards, _ in planned for f in forwards for i in f) == sorted(
                i for batch in batches for i in batch)
            for _, forwards, recompute in planned:
                assert len(forwards) >= len(batches)
                for forward in forwards:
                    assert forward_tokens(forward, lengths, padded=ranks[0].padded) <= 50 or len(forward) == 1
                # A forward recomputes exactly when some rank's forward at that place is a row over budget.
                long = [any(forward_tokens(p[1][k], lengths, padded=False) > 50 for p in planned)
                        for k in range(len(forwards))]
                assert recompute == long
    assert any(any(r) for s in range(whole.total_steps()) for r in [ranks[0].step_forwards(s)[2]])
    assert lengths[ranks[0].filler_row] == min(lengths)


# ---------------------------------------------------------------------------------------------------
# Exactness: the split step's loss and gradients equal the unsplit step's

def _rows_of_lengths(lengths: list[int], vocab: int, seed: int) -> list[EncodedRow]:
    """Rows of random tokens, the first ~40 % a prompt (labels -100), the rest trained."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        prompt = max(1, int(length * 0.4))
        rows.append(EncodedRow(row=index, input_ids=ids, labels=[-100] * prompt + ids[prompt:], roles=[0] * length))
    return rows


@pytest.fixture(scope="module")
def varied_run(tmp_path_factory):
    """A run on the tiny model whose rows have varied lengths (4 to 120 tokens)."""
    root = tmp_path_factory.mktemp("split")
    run = setup_run(_config(root, batch_size=6, grad_accum=2, max_tokens_per_forward=0))
    rng = random.Random(3)
    lengths = [rng.randint(4, 120) for _ in range(24)]
    run.train_rows = _rows_of_lengths(lengths, run.model.config.vocab_size, seed=3)
    return run, lengths


def _step_gradients(run, lengths, step: int, budget: int | None,
                    drop_last: bool = False) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients, forward passes) of one optimizer step's accumulation with `budget`;
    `drop_last`: leave the last forward out (a lost row: what the comparisons must catch)."""
    run.plan = StepPlan(lengths, run.config)
    run.plan.padded = not (run.config.packing or run.config.padding_free)
    run.plan.tokens_per_forward = budget
    _, groups, recompute = run.plan.step_forwards(step)
    batches = [_collate(run, group) for group in groups]
    denominator = step_denominator(batches, run.config.loss_normalization)
    if drop_last:
        batches, recompute = batches[:-1], recompute[:-1]
    run.model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(run, batches, denominator, recompute)
    grads = {name: p.grad.detach().clone() for name, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)
    return float(loss), grads, len(groups)


def _within_rounding(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tokens: int) -> bool:
    """Every entry of a within T * 2**-24 * max|b| of b's (per tensor; T = the step's tokens).

    Each gradient entry is a float32 sum of at most T per-token terms; reordering a sum of T terms
    moves it by at most γ_T = T·u (u = 2**-24) times the sum of the terms' magnitudes, which the
    tensor's largest entry stands for here. The tests also check that one forward left out (a lost
    row) breaks this bound, so it is tight enough to see a real mistake.
    """
    return a.keys() == b.keys() and all(
        bool(((a[name] - grad).abs() <= tokens * 2**-24 * grad.abs().max()).all()) for name, grad in b.items())


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["padding_free", "padded", "packing"])
def test_split_step_has_the_loss_and_gradients_of_the_unsplit_step(varied_run, normalization, layout):
    run, lengths = varied_run
    saved_config = run.config
    run.config = dataclasses.replace(run.config, loss_normalization=normalization,
                                     padding_free=layout == "padding_free", packing=layout == "packing")
    try:
        for step in range(2):
            _, batches = StepPlan(lengths, run.config).global_batches(step)
            tokens = sum(lengths[i] for batch in batches for i in batch)
            loss, grads, unsplit = _step_gradients(run, lengths, step, None)
            for budget in (150, 60):  # a few rows per forward; mostly one row per forward, some rows alone
                split_loss, split_grads, forwards = _step_gradients(run, lengths, step, budget)
                assert forwards > unsplit  # the budget did split the step
                # The loop sums the forwards' losses in a float32 scalar (what it reports): each of the
                # additions of positive terms rounds by at most 2**-24 of the running sum.
                assert abs(split_loss - loss) <= (forwards + unsplit) * 2**-24 * abs(loss)
                assert _within_rounding(split_grads, grads, tokens)
                _, lost_row, _ = _step_gradients(run, lengths, step, budget, drop_last=True)
                assert not _within_rounding(lost_row, grads, tokens)
            # A budget no micro-batch reaches splits nothing: the very same computation, bitwise.
            same_loss, same_grads, forwards = _step_gradients(run, lengths, step, 10**6)
            assert forwards == unsplit and same_loss == loss
            assert all(torch.equal(same_grads[name], grad) for name, grad in grads.items())
    finally:
        run.config = saved_config


def test_recomputed_forward_gives_bitwise_the_same_gradients_and_saves_less(varied_run):
    run, lengths = varied_run
    rows = [run.train_rows[i] for i in sorted(range(len(lengths)), key=lengths.__getitem__)[-3:]]
    from instructune.train.loop import collate_rows

    batch = collate_rows(run, rows)
    results = []
    for recompute in (False, True):
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        run.model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with recomputing(run.model, recompute):
                out = run.parallel.loss(batch)
            out.loss_sum.backward()
        results.append((float(out.loss_sum), {n: p.grad.clone() for n, p in run.model.named_parameters()},
                        sum(saved)))
    (loss, grads, plain), (loss_again, grads_again, recomputed) = results
    assert loss == loss_again and recomputed * 2 < plain
    assert all(torch.equal(grads[name], grads_again[name]) for name in grads)
    # Flags restored: the model's layers are back to not checkpointing.
    from instructune.train.recompute import checkpointing_layers

    assert not any(layer.gradient_checkpointing for layer in checkpointing_layers(run.model))


def _saved_bytes_during_forward(model, batch, run, recompute: bool) -> int:
    """Bytes of the tensors autograd keeps for backward after the forward (checkpointed regions count
    only their inputs; the recomputation happens in backward)."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with recomputing(model, recompute):
            out = run.parallel.loss(batch)
    out.loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def test_saved_activations_grow_linearly_with_row_length_and_recomputing_cuts_them(varied_run):
    # A long context on the tiny model: rows of 1k and 4k tokens, no L x L attention matrix kept
    # (SDPA's memory-efficient path), so 4x the tokens saves 4x the bytes (to the few fixed-size tensors).
    run, _ = varied_run
    from instructune.testing import make_tiny_model

    model = make_tiny_model(run.model.config.vocab_size, hidden_size=32)
    model.config.max_position_embeddings = 8192
    vocab = model.config.vocab_size
    saved_model, run.model = run.model, model
    try:
        from instructune.model.varlen_attention import use_varlen_attention
        from instructune.train.loop import collate_rows

        use_varlen_attention(model)
        model.train()
        run.parallel.module.model = model
        sizes = {}
        for length in (1024, 4096):
            batch = collate_rows(run, _rows_of_lengths([length], vocab, seed=length))
            sizes[length] = {recompute: _saved_bytes_during_forward(model, batch, run, recompute)
                             for recompute in (False, True)}
        for recompute in (False, True):
            ratio = sizes[4096][recompute] / sizes[1024][recompute]
            assert 3.9 <= ratio <= 4.1, (recompute, ratio)  # linear, not quadratic (16x)
        # Recomputing keeps the layers' inputs only: several times less.
        assert sizes[4096][True] * 3 < sizes[4096][False]
    finally:
        run.model = saved_model
        run.parallel.module.model = saved_model


# ---------------------------------------------------------------------------------------------------
# The automatic budget

def test_automatic_budget_follows_the_documented_rule(varied_run):
    run, _ = varied_run
    model = run.model
    per_token = activation_bytes_per_token(model)
    config = model.config
    assert per_token == config.num_hidden_layers * (6 * config.hidden_size + 3 * config.intermediate_size) * 4
    params = sum(p.numel() for p in model.parameters())
    state = 16 * params  # fp32 weights, gradients and two AdamW moments
    free = state + 2 * 10_000 * per_token
    assert auto_tokens_per_forward(model, torch.device("cpu"), free=free) == 10_000
    assert auto_tokens_per_forward(model, torch.device("cpu"), free=state // 2) == MIN_TOKENS  # tight: floor
    assert activation_bytes_per_token(model, lean_layers=False) == int(per_token * 1.6)


def test_budget_setting_is_checked_like_any_other_key(tmp_path):
    from instructune.errors import UserError

    with pytest.raises(UserError, match="'max_tokens_per_forward' must be 0 \\(no limit\\) or more, got -1"):
        load_config(None, ["max_tokens_per_forward=-1"])
    assert load_config(None, ["max_tokens_per_forward=0"]).max_tokens_per_forward == 0
    assert load_config(None, []).max_tokens_per_forward is None


# ---------------------------------------------------------------------------------------------------
# Two ranks with a split equal one process without it (torchrun, gloo on CPU)

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# As in test_distributed.py: 41 training rows in micro-batches of 4, one of them a single row, so rank
# 1's share of it is empty; here every share is also split by the budget.
RANK_SETTINGS = {"batch_size": 4, "grad_accum": 2, "lr": 1e-2, "epochs": 1, "eval_fraction": 0.08, "eval_every": 3,
                 "save_every": 0, "log_every": 1, "dist_timeout_s": 60, "max_length": 64}


@needs_gloo
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_split_ranks_equal_one_unsplit_process(tmp_path, strategy):
    import math
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from instructune.train.checkpoint import latest_checkpoint
    from instructune.train.loop import train
    from train_fixtures import train_records

    model, data = write_tiny_model(tmp_path / "model"), write_toy_data(tmp_path / "data.jsonl", rows=45)
    lines = [f"model: {model}", f"data: {data}"] + [f"{key}: {value}" for key, value in RANK_SETTINGS.items()]
    (tmp_path / "run.yaml").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(tmp_path / "cache")}
    # The plan on 2 ranks really splits, pads a rank with an empty forward and recomputes some rows.
    probe = setup_run(load_config(tmp_path / "run.yaml", [f"output_dir={tmp_path / 'probe'}"]))
    lengths = [len(row) for row in probe.train_rows]
    # The middle one of the rows' distinct lengths: a share of 2 rows becomes 2 forwards, and the rows
    # longer than it recompute their activations while the others do not.
    distinct = sorted(set(lengths))
    budget = distinct[len(distinct) // 2]
    plans = [StepPlan(lengths, probe.config, world_size=2, rank=r) for r in range(2)]
    for plan in plans:
        plan.tokens_per_forward, plan.padded = budget, probe.plan.padded
    steps = [[plan.step_forwards(s) for s in range(probe.plan.total_steps())] for plan in plans]
    assert any(len(f) > 2 for _, f, _ in steps[0])  # more forwards than micro-batches
    assert any([] in f for rank in steps for _, f, _ in rank)  # an empty forward keeps a rank in step
    flags = [flag for _, _, recompute in steps[0] for flag in recompute]
    assert any(flags) and not all(flags)

    one = tmp_path / "one"
    train(load_config(tmp_path / "run.yaml", [f"output_dir={one}", "max_tokens_per_forward=0"]))
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "instructune", "train", str(tmp_path / "run.yaml"), f"output_dir={two}",
               f"max_tokens_per_forward={budget}", f"distributed={strategy}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    got, want = train_records(two), train_records(one)
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for key, value in b.items():
            if isinstance(value, float):  # float32 rounding of another summation order (see the module docstring)
                assert math.isclose(a[key], value, rel_tol=1e-5, abs_tol=1e-7), (b["step"], key, a[key], value)
            else:
                assert a[key] == value, (b["step"], key)
    weights, expected = (load_file(latest_checkpoint(d) / "model.safetensors") for d in (two, one))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
