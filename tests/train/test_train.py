"""The training loop on tiny models: data order, schedule, normalisation, resume, LoRA, generation."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from instructune.errors import UserError
from instructune.train.config import load_config
from instructune.train.loop import _optimizer_step, fit, setup_run, train
from instructune.train.metrics import read_metrics
from instructune.train.optim import lr_at, parameter_groups
from instructune.train.setup import _split_rows
from instructune.train.step_plan import StepPlan, step_denominator
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def config_for(tiny, output_dir, **extra):
    return load_config(overrides=quick_settings(*tiny, output_dir, **extra))


# ---------------------------------------------------------------------------------------------------
# Pure pieces

def test_step_plan_covers_every_row_once_per_epoch_and_is_deterministic():
    lengths = [5 + (i * 7) % 13 for i in range(23)]
    config = load_config(overrides=["batch_size=4", "grad_accum=2", "epochs=2", "seed=3"])
    plan = StepPlan(lengths, config)
    assert plan.steps_in_epoch(0) == 3  # 6 micro-batches of <= 4 rows, 2 per step
    assert plan.total_steps() == 6
    for epoch, steps in ((0, range(0, 3)), (1, range(3, 6))):
        rows = [i for s in steps for batch in plan.step(s)[1] for i in batch]
        assert sorted(rows) == list(range(23))
        assert all(plan.step(s)[0] == epoch for s in steps)
    again = StepPlan(lengths, config)
    assert [again.step(s) for s in range(6)] == [plan.step(s) for s in range(6)]
    assert plan.step(0)[1] != plan.step(3)[1]  # a new order every epoch
    # Ranks split every micro-batch of the single-process plan: the global batch is the same.
    for world in (2, 3, 5):
        ranks = [StepPlan(lengths, config, world_size=world, rank=r) for r in range(world)]
        assert ranks[0].total_steps() == plan.total_steps()
        for s in range(6):
            shares = [rank.step(s)[1] for rank in ranks]
            assert all(len(share) == len(plan.step(s)[1]) for share in shares)  # as many micro-batches each
            for m, batch in enumerate(plan.step(s)[1]):
                assert sorted(i for share in shares for i in share[m]) == sorted(batch)
    beyond = StepPlan(lengths, dataclasses.replace(config, max_steps=10))
    assert beyond.total_steps() == 10 and beyond.step(9)[0] == 3  # max_steps runs on into later epochs


def test_packed_plan_fits_the_token_budget():
    lengths = [3, 9, 4, 6, 2, 8, 5, 7]
    config = load_config(overrides=["batch_size=2", "max_length=10", "packing=true"])
    batches = StepPlan(lengths, config).epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 20 for b in batches)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_decay(schedule):
    lrs = [lr_at(s, peak=1.0, total_steps=10, warmup_steps=2, schedule=schedule) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(lr > 0 for lr in lrs)
    if schedule == "constant":
        assert set(lrs) == {0.5, 1.0}
    else:
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] < 0.2
    if schedule == "cosine":
        assert math.isclose(lrs[6], 0.5)  # halfway through the decay


def test_weight_decay_spares_biases_and_norms(tiny):
    from instructune.model.load import load_model

    model = load_model(str(tiny[0]))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_eval_split_is_disjoint_and_fixed_by_the_seed():
    rows = list(range(40))
    config = load_config(overrides=["eval_fraction=0.1", "seed=5"])
    train_rows, eval_rows = _split_rows(rows, config)
    assert len(eval_rows) == 4 and sorted(train_rows + eval_rows) == rows
    assert _split_rows(rows, config) == (train_rows, eval_rows)
    assert _split_rows(rows, dataclasses.replace(config, eval_fraction=0.0)) == (rows, [])


# ---------------------------------------------------------------------------------------------------
# The loop

def _gradients(run, groups):
    """The loss and gradients of one step over `groups` of rows, leaving the weights as they are."""
    import instructune.train.loop as train_module

    batches = [train_module._collate(run, g) for g in groups]
    run.model.zero_grad(set_to_none=True)
    run.optimizer.step = run.optimizer.zero_grad = lambda *args, **kwargs: None
    recycle = train_module.recycle_head_gradient
    train_module.recycle_head_gradient = lambda model: None  # leave the gradients on the weights to read
    try:
        loss, _ = _optimizer_step(run, batches, step_denominator(batches, run.config.loss_normalization), 0.0)
    finally:
        train_module.recycle_head_gradient = recycle
    return loss, {n: p.grad.clone() for n, p in run.model.named_parameters()}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_one_batch_of_8_equals_8_accumulated_batches_of_1(tiny, tmp_path, normalization):
    run = setup_run(config_for(tiny, tmp_path / "run", loss_normalization=normalization))
    rows = list(range(1, 9))
    loss_1x8, grads_1x8 = _gradients(run, [rows])
    loss_8x1, grads_8x1 = _gradients(run, [[i] for i in rows])
    assert math.isclose(loss_1x8, loss_8x1, rel_tol=1e-5)
    for name, grad in grads_1x8.items():
        torch.testing.assert_close(grads_8x1[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_falls_and_metrics_have_every_field(tiny, tmp_path):
    result = train(config_for(tiny, tmp_path / "run", max_steps=24))
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 25))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "trained_tokens", "tokens_per_s", "elapsed_s"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    assert steps[-1]["tokens"] > steps[-1]["trained_tokens"] > 0
    assert sum(r["loss"] for r in steps[-4:]) < 0.7 * sum(r["loss"] for r in steps[:4])
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 20, 24]
    assert evals[-1]["loss"] < evals[0]["loss"] and 0 <= evals[-1]["accuracy"] <= 1
    assert result.eval_metrics["loss"] == evals[-1]["loss"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.tokenizer == saved.model and saved.lr == 1e-2 and saved.warmup_steps == 1


def test_resume_equals_uninterrupted_bitwise_with_lora_dropout_and_accumulation(tiny, tmp_path):
    # save_optimizer=all: cutting the run back below leaves checkpoint-4 the newest, as a kill would have.
    extra = dict(max_steps=12, grad_accum=2, lora={"r": 4, "dropout": 0.2}, save_every=4, save_optimizer="all")
    train(config_for(tiny, tmp_path / "reference", **extra))
    interrupted = tmp_path / "interrupted"
    train(config_for(tiny, interrupted, **extra))
    # As if killed after step 9: the checkpoints after 4 never happened, metrics ran on to step 9.
    shutil.rmtree(interrupted / "checkpoint-8")
    shutil.rmtree(interrupted / "checkpoint-12")
    metrics = interrupted / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:11]))
    train(dataclasses.replace(config_for(tiny, interrupted, **extra), resume=True))
    assert train_records(interrupted) == train_records(tmp_path / "reference")
    from safetensors.torch import load_file

    final = load_file(interrupted / "checkpoint-12" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "checkpoint-12" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_of_a_full_fine_tuning_run_and_of_a_finished_run(tiny, tmp_path, capsys):
    train(config_for(tiny, tmp_path / "reference", max_steps=8))
    run = tmp_path / "run"
    train(config_for(tiny, run, max_steps=8, save_optimizer="all"))  # as if killed before checkpoint-8:
    shutil.rmtree(run / "checkpoint-8")  # checkpoint-4 was the newest then, with its optimizer state
    resumed = train(config_for(tiny, run, max_steps=8, resume=True))
    assert train_records(run) == train_records(tmp_path / "reference")
    again = train(config_for(tiny, run, max_steps=8, resume=True))  # finished: not an error
    assert again.checkpoint == resumed.checkpoint and train_records(run) == train_records(tmp_path / "reference")
    assert again.eval_metrics == resumed.eval_metrics
    assert "had already finished (8 steps)" in capsys.readouterr().out
    train(config_for(tiny, run, max_steps=9, resume=True, seed=7))  # one more step, on purpose
    assert "settings changed since the checkpoint: max_steps (was 8, now 9); seed (was 42, now 7)" in (
        capsys.readouterr().out)


def test_an_existing_run_is_not_overwritten_by_accident(tiny, tmp_path):
    train(config_for(tiny, tmp_path / "run", max_steps=2))
    with pytest.raises(UserError) as info:
        train(config_for(tiny, tmp_path / "run", max_steps=2))
    # The message says exactly what to add to the command.
    assert str(info.value) == (
        f"{tmp_path / 'run'} already holds a run (checkpoint-2); add resume=true to the command to continue it, "
        f"overwrite=true to start it again (its checkpoints are deleted), or output_dir={tmp_path / 'run-2'} "
        "for a new run")
    train(config_for(tiny, tmp_path / "run", max_steps=3, overwrite=True))
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-3"]


def test_missing_data_is_a_user_error(tiny, tmp_path):
    config = dataclasses.replace(config_for(tiny, tmp_path / "run"), data=None)
    with pytest.raises(UserError, match="'data' is not set"):
        train(config)


def test_packing_and_sequence_normalisation_train(tiny, tmp_path):
    train(config_for(tiny, tmp_path / "packed", packing=True, max_length=64, batch_size=2, max_steps=16))
    losses = [r["loss"] for r in read_metrics(tmp_path / "packed") if r["split"] == "train"]
    assert losses[-1] < losses[0]
    train(config_for(tiny, tmp_path / "sequence", loss_normalization="sequence", max_steps=4))


def test_lora_changes_only_adapter_weights_and_merged_logits_match(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, _ = tiny
    run = setup_run(config_for(tiny, tmp_path / "run", max_steps=6, lora={"r": 4}))
    result = fit(run)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = load_file(model_dir / "model.safetensors")
    for name, weight in run.model.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(weight, base[name.replace(".base_layer", "")]), name  # never moved
    adapter = load_file(result.checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero

    merged_run = train(config_for(tiny, tmp_path / "merged", max_steps=6, lora={"r": 4}, merge_lora=True))
    assert merged_run.merged == tmp_path / "merged" / "merged"
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), merged_run.checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(merged_run.merged)
    ids = torch.tensor([[3, 10, 20, 30, 40, 4, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)
        # A plain transformers load of the checkpoint folder brings the adapter along with its base.
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged_run.checkpoint)(ids).logits,
                                   with_adapter(ids).logits)


# ---------------------------------------------------------------------------------------------------
# Generation and the default job's measures

def test_batched_greedy_generation_equals_one_at_a_time(tiny):
    from instructune.data.conversation import Conversation, Message
    from instructune.data.templates import resolve_template
    from instructune.model.load import load_model, load_tokenizer
    from instructune.use.generation import encode_prompts, generate_ids

    tokenizer = load_tokenizer(str(tiny[0]))
    model = load_model(str(tiny[0]))
    template = resolve_template(None, tokenizer)
    questions = ["Hello", "What is the capital of France?", "How are you? I am fine."]
    prompts = encode_prompts(tokenizer, template, [Conversation([Message("user", q)]) for q in questions])
    assert tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n")
    batched = generate_ids(model, prompts, pad_token_id=0, stop_token_ids=[2, 4], max_new_tokens=12)
    for prompt, output in zip(prompts, batched, strict=True):
        ids, expected = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(ids).logits[0, -1].argmax())
                if token in (2, 4):
                    break
                expected.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert output == expected


def test_training_collates_padding_free_only_when_the_attention_takes_boundaries(tiny, tmp_path):
    from instructune.model.varlen_attention import takes_row_boundaries
    from instructune.train.loop import _collate

    run = setup_run(config_for(tiny, tmp_path / "flat"))
    assert takes_row_boundaries(run.model)
    batch = _collate(run, [0, 1, 2])
    assert "cu_seq_lens" in batch and "attention_mask" not in batch
    lengths = [len(run.train_rows[i]) for i in (0, 1, 2)]
    assert batch["input_ids"].shape == (1, sum(lengths))

    padded = setup_run(config_for(tiny, tmp_path / "padded", padding_free=False))
    assert not takes_row_boundaries(padded.model)
    assert "attention_mask" in _collate(padded, [0, 1, 2])


def test_gradient_checkpointing_recomputes_padding_free_attention_per_row(tiny, tmp_path):
    # The recomputed forward must get the row boundaries again (and no block mask): same loss and gradients.
    plain = setup_run(config_for(tiny, tmp_path / "plain"))
    checkpointed = setup_run(config_for(tiny, tmp_path / "checkpointed", gradient_checkpointing=True))
    groups = [[1, 2, 3, 4], [5, 6]]
    loss_plain, grads_plain = _gradients(plain, groups)
    loss_checkpointed, grads_checkpointed = _gradients(checkpointed, groups)
    assert math.isclose(loss_plain, loss_checkpointed, rel_tol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# Runs that cannot start, or fail: a clear error, and no empty output folder left behind

def test_every_row_dropped_stops_with_the_reasons_and_the_inspect_command(tiny, tmp_path):
    model, data = tiny
    output = tmp_path / "runs" / "dropped"
    with pytest.raises(UserError) as info:
        train(config_for(tiny, output, max_length=4, truncation="drop"))
    assert str(info.value) == (f"{data}: no rows kept: 48 too_long; `instructune inspect {data} --tokenizer {model} "
                               "--max-length 4 --truncation drop` shows why")
    assert not (tmp_path / "runs").exists()  # the folders this run created are gone again


def test_a_broken_template_file_stops_the_run_before_data_or_folders(tiny, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    config = dataclasses.replace(config_for(tiny, tmp_path / "run"), template=str(template),
                                 data=str(tmp_path / "no-such-data.jsonl"))
    with pytest.raises(UserError, match=rf"^template file {template}, line 2, column 17: Jinja syntax error"):
        train(config)
    assert not (tmp_path / "run").exists()


def _fail_at_step(monkeypatch, failing_step):
    import instructune.train.loop as loop

    def lr_or_fail(step, **kwargs):
        if step == failing_step:
            raise RuntimeError("boom")
        return lr_at(step, **kwargs)

    monkeypatch.setattr(loop, "lr_at", lr_or_fail)


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _fail_at_step(monkeypatch, 2)  # metrics.jsonl has rows by then, but no checkpoint exists
    with pytest.raises(RuntimeError):
        train(config_for(tiny, tmp_path / "new" / "run", save_every=4))
    assert (tmp_path / "new" / "run").exists()  # metrics rows are worth keeping
    _fail_at_step(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        train(config_for(tiny, tmp_path / "other" / "run"))
    assert not (tmp_path / "other").exists()


def test_a_failed_run_keeps_folders_that_existed_or_hold_a_checkpoint(tiny, tmp_path, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        train(dataclasses.replace(config_for(tiny, existing), data=str(tmp_path / "missing.jsonl")))
    assert existing.is_dir()
    _fail_at_step(monkeypatch, 5)
    with pytest.raises(RuntimeError):
        train(config_for(tiny, tmp_path / "fresh", save_every=4))
    assert (tmp_path / "fresh" / "checkpoint-4" / "COMPLETE").exists()
