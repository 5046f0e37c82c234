"""The training loop: prepare the data, build the model, run optimizer steps, evaluate, checkpoint.

`setup_run` does everything before the first step (data, model, optimizer, resume) and `fit` runs
the steps; `train` is the two together. One optimizer step:

1. take the step's micro-batches, a pure function of (seed, epoch, step) (`step_plan.StepPlan`), so a
   resumed run trains on exactly the batches the interrupted one would have;
2. count the step's targets once, over all its micro-batches and ranks (`step_plan.step_counts`, one
   all-reduce);
3. for each micro-batch: the selective-head loss *sum* divided by that count, backward;
4. clip, set the scheduled learning rate, AdamW step; one host sync to read the loss.

Several ranks (`torchrun`, see `instructune.distributed`): the step's micro-batches are the same as on
one process, and each rank trains on its share of every one; DDP or FSDP2 sums the gradients. Rank 0
alone prints, writes metrics and checkpoints; every rank evaluates its share of the eval rows.
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from instructune.checkpoint import (
    CONFIG_FILE,
    latest_checkpoint,
    load_trainer_state,
    quiet_saving,
    remove_leftovers,
    restore_rng,
    save_checkpoint,
)
from instructune.config import (
    DEFAULT_WARMUP_FRACTION,
    FIELD_NAMES,
    TrainConfig,
    config_to_yaml,
    load_config,
    save_config,
)
from instructune.data.batching import collate_packed, collate_padded
from instructune.data.encoded import EncodedRow
from instructune.distributed import NoMetrics, Parallel, init_distributed, shutdown, without_targets
from instructune.errors import UserError
from instructune.loss import recycle_head_gradient, row_mean_sum
from instructune.metrics import METRICS_FILE, MetricsLogger, ProgressReporter, plot_losses
from instructune.optim import build_optimizer, default_warmup_steps, grad_norm, lr_at, set_lr
from instructune.step_plan import StepPlan, step_counts
from instructune.varlen_attention import takes_row_boundaries, use_varlen_attention

RUN_FILES = ("config.yaml", METRICS_FILE, "loss.png", "tensorboard", "merged")
"""What a run writes into its output folder besides checkpoints (removed by `overwrite: true`)."""


# ---------------------------------------------------------------------------------------------------
# Setting up a run

@dataclass
class TrainingRun:
    """Everything `fit` needs, built by `setup_run`."""

    config: TrainConfig
    """The resolved configuration (no nulls left that have a default)."""
    output_dir: Path
    model: torch.nn.Module
    tokenizer: object
    template: str
    """The Jinja chat template text the data was rendered with (saved with every checkpoint)."""
    train_rows: list[EncodedRow]
    eval_rows: list[EncodedRow]
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    device: torch.device
    parallel: Parallel = field(default_factory=Parallel)
    """This rank among the ranks (one process: rank 0 of 1); runs the loss through DDP or FSDP."""
    start_step: int = 0
    state: dict = field(default_factory=dict)
    """Counters carried across resumes: tokens, trained_tokens, elapsed_s."""
    resumed_from: Path | None = None
    eval_sets: dict[str, list[EncodedRow]] = field(default_factory=dict)
    """More rows scored at every evaluation, by name; each adds `<name>_loss`, `<name>_accuracy` and
    `<name>_targets` (over that set's own labels) to the eval record. `instructune compare` uses it."""


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype: fp32 on CPU, bf16 on CUDA unless the config says otherwise."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if config.dtype == "auto":
        return device, torch.bfloat16 if use_cuda else torch.float32
    return device, getattr(torch, config.dtype)


def _prepare_output_dir(config: TrainConfig, output_dir: Path, console) -> Path | None:
    """Make the output folder ready; return the checkpoint to resume from, if any."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir)
    latest = latest_checkpoint(output_dir)
    if config.resume:
        if latest is None:
            console.print(f"resume: no complete checkpoint in {output_dir}, starting from the beginning")
        return latest
    has_run = latest is not None or (output_dir / METRICS_FILE).exists()
    if has_run and not config.overwrite:
        raise UserError(
            f"{output_dir} already holds a run; pass resume=true to continue it, overwrite=true to start "
            "it again, or output_dir=... for a new one")
    if has_run:
        for entry in output_dir.iterdir():
            if entry.name.startswith("checkpoint-") or entry.name in RUN_FILES:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return None


def _split_rows(rows: list[EncodedRow], config: TrainConfig) -> tuple[list[EncodedRow], list[EncodedRow]]:
    """Hold out `eval_fraction` of the rows (chosen by the seed alone) for evaluation."""
    if config.eval_fraction == 0 or len(rows) < 2:
        return rows, []
    count = min(max(1, round(len(rows) * config.eval_fraction)), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(f"instructune-split-{config.seed}").shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prepare_splits(config: TrainConfig, tokenizer, console) -> tuple[list[EncodedRow], list[EncodedRow], str]:
    """Encode the training (and evaluation) data; returns (train rows, eval rows, template text)."""
    from instructune.data.prepare import prepare_dataset

    options = dict(template=config.template, data_format=config.format, train_on=config.train_on,
                   max_length=config.max_length, truncation=config.truncation, on_bad_row=config.on_bad_row,
                   num_proc=config.num_proc)
    prepared = prepare_dataset(config.data, tokenizer, **options)
    _print_report(console, config.data, prepared.report)
    if config.eval_data:
        evaluation = prepare_dataset(config.eval_data, tokenizer, **options)
        _print_report(console, config.eval_data, evaluation.report)
        return prepared.rows, evaluation.rows, prepared.template
    train_rows, eval_rows = _split_rows(prepared.rows, config)
    return train_rows, eval_rows, prepared.template


def _print_report(console, source: str, report) -> None:
    dropped = sum(report.dropped.values())
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
    console.print(
        f"data {source}: {report.rows_kept:,} of {report.rows_read:,} rows kept"
        + (f" ({dropped:,} dropped: {detail})" if dropped else "")
        + f", {report.tokens_total:,} tokens, {report.trained_fraction:.0%} trained", markup=False, highlight=False)


def build_model(config: TrainConfig, tokenizer, template: str, device: torch.device, dtype: torch.dtype,
                resume_from: Path | None):
    """Load the model (from the checkpoint when resuming full fine-tuning), fit it to the tokenizer, add LoRA."""
    from instructune.data.templates import end_of_turn_token_ids
    from instructune.model import load_model

    full_checkpoint = resume_from is not None and config.lora is None
    source = str(resume_from) if full_checkpoint else config.model
    model = load_model(source, device=str(device), dtype=dtype, trust_remote_code=config.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a built-in template added its markers
    # Saved checkpoints then stop `generate` at the end of a turn, not only at EOS.
    model.generation_config.eos_token_id = end_of_turn_token_ids(tokenizer, template)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device.type == "cuda" and config.packing and importlib.util.find_spec("flash_attn") is not None:
        # Padding-free packing: the loss hands flash-attention the row boundaries (varlen kernel), so no
        # mask is built at all. Without flash-attn, sdpa gets a block-diagonal mask from the positions.
        model.set_attn_implementation("flash_attention_2")
    elif device.type == "cpu" and (config.padding_free or config.packing):
        # Rows concatenated without padding; attention per row from the boundaries (varlen_attention.py).
        use_varlen_attention(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora is not None:
        from instructune.lora import apply_lora

        model = apply_lora(model, config.lora)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
        if resume_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_from / "adapter_model.safetensors"),
                                                       device=str(device)))
    if config.fused_layers:
        from instructune.fused_layers import apply_fused_layers

        apply_fused_layers(model)  # after LoRA, which it sees: an MLP with an adapter on down_proj is left alone
    model.train()
    return model


def resolve_config(config: TrainConfig, name: str, total_steps: int | None = None) -> TrainConfig:
    """Fill the defaults that depend on other keys: tokenizer, lr, output_dir, warmup_steps."""
    resolved = replace(config, tokenizer=config.tokenizer or config.model, lr=config.effective_lr,
                       output_dir=config.output_dir or str(Path("runs") / name))
    if total_steps is not None and resolved.warmup_steps is None:
        resolved = replace(resolved, warmup_steps=default_warmup_steps(total_steps, DEFAULT_WARMUP_FRACTION))
    return resolved


def setup_run(config: TrainConfig, *, name: str = "default", console=None) -> TrainingRun:
    """Prepare data, model and optimizer, and load the latest checkpoint when resuming."""
    from rich.console import Console

    from instructune.model import load_tokenizer

    console = console or Console(highlight=False, soft_wrap=True)
    if not config.data:
        raise UserError("'data' is not set: give the training data in the config or as data=PATH")
    config = resolve_config(config, name)
    output_dir = Path(config.output_dir)
    device, dtype = resolve_device(config)
    parallel = init_distributed(config, device)
    device, console = parallel.device, console if parallel.is_main else Console(quiet=True)
    resume_from = parallel.on_main(lambda: _prepare_output_dir(config, output_dir, console))
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    with parallel.local_main_first():  # it converts and encodes once; the others read its caches
        tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
        train_rows, eval_rows, template = prepare_splits(config, tokenizer, console)
    if not train_rows:
        raise UserError(f"{config.data}: no row left to train on")
    tokenizer.chat_template = template  # checkpoints chat with the template they were trained with
    plan = StepPlan([len(r) for r in train_rows], config, world_size=parallel.world_size, rank=parallel.rank)
    config = resolve_config(config, name, plan.total_steps())  # the plan reads no key this changes

    # FSDP loads the full weights into CPU memory; sharding then moves each rank's shards to its GPU.
    model = build_model(config, tokenizer, template, torch.device("cpu") if parallel.sharded else device, dtype,
                        resume_from)
    parallel.wrap(model)  # before the optimizer: FSDP replaces the parameters with shards
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    run = TrainingRun(config=config, output_dir=output_dir, model=model, tokenizer=tokenizer, template=template,
                      train_rows=train_rows, eval_rows=eval_rows, optimizer=optimizer, plan=plan, device=device,
                      parallel=parallel, state={"tokens": 0, "trained_tokens": 0, "elapsed_s": 0.0})
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        parallel.load_optimizer_state(resume_from, optimizer)
        restore_rng(resume_from, state)  # last: loading the model above drew random numbers
        run.start_step, run.resumed_from = state["step"], resume_from
        run.state = {key: state[key] for key in run.state}
        console.print(f"resuming from {resume_from} (step {run.start_step} of {plan.total_steps()})", markup=False)
        _note_changed_settings(resume_from, config, console)
        if state.get("world_size", 1) != parallel.world_size:
            console.print(f"note: the checkpoint was written on {state.get('world_size', 1)} rank(s), this run has "
                          f"{parallel.world_size}: the global batch, data order and loss are the same", markup=False)
    if parallel.is_main:
        save_config(config, output_dir / "config.yaml")
    return run


def _note_changed_settings(checkpoint: Path, config: TrainConfig, console) -> None:
    """Say which settings differ from the checkpoint's: a resumed run then no longer matches the original."""
    try:
        saved = load_config(checkpoint / CONFIG_FILE)
    except UserError:  # written by another version; nothing to compare against
        return
    ignored = {"resume", "overwrite", "log_every", "distributed", "dist_timeout_s"}  # same results either way
    changed = [f"{key} (was {getattr(saved, key)!r}, now {getattr(config, key)!r})" for key in FIELD_NAMES
               if key not in ignored and getattr(saved, key) != getattr(config, key)]
    if changed:
        console.print("note: settings changed since the checkpoint: " + "; ".join(changed), markup=False)


# ---------------------------------------------------------------------------------------------------
# Running it

def collate_rows(run: TrainingRun, rows: list[EncodedRow]) -> dict[str, torch.Tensor]:
    """A training micro-batch: one padding-free sequence when packing or when the attention takes row
    boundaries (`padding_free`), else rows padded to the longest."""
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    flat = run.config.packing or (run.config.padding_free and takes_row_boundaries(run.model))
    return collate_packed(rows, pad) if flat else collate_padded(rows, pad)


def _collate(run: TrainingRun, indices: list[int]) -> dict[str, torch.Tensor]:
    if not indices:  # this rank's share of the micro-batch is empty: a row without targets keeps it in step
        return without_targets(_collate(run, [0]))
    return collate_rows(run, [run.train_rows[i] for i in indices])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(run: TrainingRun, eval_rows: list[EncodedRow] | None = None) -> dict[str, float]:
    """Loss over the labelled tokens (token-normalised) and next-token accuracy; default: the eval rows."""
    eval_rows = run.eval_rows if eval_rows is None else eval_rows
    run.model.eval()
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(eval_rows)), key=lambda i: len(eval_rows[i]))
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct, targets = 0, 0
    size, parallel = run.config.batch_size, run.parallel
    # Rank r scores every world_size-th batch; a rank left without one scores a row without targets, so
    # that all ranks run as many forwards (FSDP all-gathers in each).
    for first in range(0, len(order), size * parallel.world_size):
        rows = [eval_rows[i] for i in order[first + parallel.rank * size:first + (parallel.rank + 1) * size]]
        batch = collate_padded(rows or [eval_rows[order[0]]], pad)
        out = parallel.loss(_to_device(batch if rows else without_targets(batch), run.device), compute_accuracy=True)
        loss_sum += out.loss_sum.double().cpu()
        correct += int(out.num_correct)
        targets += out.num_targets
    loss_sum, correct, targets = parallel.sum(loss_sum, correct, targets)
    correct, targets = int(correct), int(targets)
    run.model.train()
    return {"loss": float(loss_sum) / max(targets, 1), "accuracy": correct / max(targets, 1), "targets": targets}


def evaluate_all(run: TrainingRun) -> dict[str, float]:
    """`evaluate` on the eval rows, plus `<name>_loss` etc. for every set in `run.eval_sets`."""
    metrics = evaluate(run)
    for name, rows in run.eval_sets.items():
        metrics.update({f"{name}_{key}": value for key, value in evaluate(run, rows).items()})
    return metrics


def _optimizer_step(run: TrainingRun, batches: list[dict[str, torch.Tensor]], denominator: int,
                    lr: float) -> tuple[float, float]:
    """One optimizer step over `batches`; returns (loss, grad norm before clipping)."""
    config = run.config
    set_lr(run.optimizer, lr)
    total = torch.zeros((), device=run.device)
    for index, batch in enumerate(batches):
        batch = _to_device(batch, run.device)
        sync = index == len(batches) - 1  # DDP sums the ranks' gradients once, in the last backward
        if config.loss_normalization == "token":
            loss = run.parallel.loss(batch, sync=sync).loss_sum / denominator
        else:
            loss = row_mean_sum(run.parallel.loss(batch, sync=sync, per_row=True)) / denominator
        loss.backward()
        total += loss.detach()
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.parallel.sharded:  # FSDP: torch's clipping knows how to reduce the norm over the shards
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf, foreach=True)
    else:
        norm = _clip(run.optimizer, params, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.grad_scale = None
    recycle_head_gradient(run.model)  # its memory stays mapped for the next step's head
    run.optimizer.zero_grad(set_to_none=True)
    return run.parallel.sum(total)[0], float(norm)  # the step's one host sync (and all-reduce of the loss)


def _clip(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global-norm clipping (`clip_grad_norm_`'s factor, `grad_norm`'s accurate norm); returns the norm.

    `clip_grad_norm_` multiplies every gradient by the clipping factor in place: a read and a write of
    all gradients. The fused AdamW kernel already reads them, and divides each by `optimizer.grad_scale`
    when one is set (the hook `GradScaler` uses), so there the factor is handed over as 1 / factor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads)
    if max_norm and grads:
        factor = torch.clamp(max_norm / (norm.to(grads[0].device) + 1e-6), max=1.0)
        if optimizer.defaults.get("fused"):
            optimizer.grad_scale = factor.reciprocal()
        else:
            torch._foreach_mul_(grads, factor)
    return norm


def _save(run: TrainingRun, step: int, epoch: int) -> None:
    model_state, optimizer_state = run.parallel.gather_state(run.optimizer)  # FSDP: from every rank's shards
    if run.parallel.is_main:
        save_checkpoint(run.output_dir, step, model=run.model, tokenizer=run.tokenizer,
                        config_yaml=config_to_yaml(run.config), optimizer=run.optimizer,
                        state={**run.state, "epoch": epoch, "total_steps": run.plan.total_steps(),
                               "world_size": run.parallel.world_size},
                        keep_last=run.config.keep_last, model_state=model_state, optimizer_state=optimizer_state)
    run.parallel.barrier()  # no rank goes on (or looks for the checkpoint) before it is complete


@dataclass
class TrainResult:
    """What a finished run left behind."""

    output_dir: Path
    checkpoint: Path
    """The final checkpoint (loadable with transformers)."""
    steps: int
    last_loss: float | None
    eval_metrics: dict[str, float] | None
    merged: Path | None = None


def fit(run: TrainingRun, *, console=None) -> TrainResult:
    """Run the optimizer steps from `run.start_step` to the end, evaluating and saving on schedule."""
    from rich.console import Console

    console = (console or Console(highlight=False, soft_wrap=True)) if run.parallel.is_main else Console(quiet=True)
    config, total_steps = run.config, run.plan.total_steps()
    resume_step = run.start_step if run.resumed_from else None
    logger = MetricsLogger(run.output_dir, resume_step=resume_step) if run.parallel.is_main else NoMetrics()
    progress = ProgressReporter(console, total_steps, run.start_step, run.state["tokens"], config.log_every)
    last_loss, eval_metrics, epoch = None, None, 0
    started = time.perf_counter() - run.state["elapsed_s"]
    try:
        for step in range(run.start_step, total_steps):
            step_start = time.perf_counter()
            epoch, groups = run.plan.step(step)
            batches = [_collate(run, group) for group in groups]
            tokens = sum(len(run.train_rows[i]) for group in groups for i in group)
            denominator, targets, tokens = step_counts(batches, config.loss_normalization, tokens, run.parallel)
            run.parallel.seed_step(config.seed, step)
            lr = lr_at(step, peak=config.lr, total_steps=total_steps, warmup_steps=config.warmup_steps,
                       schedule=config.schedule)
            last_loss, grad_norm = _optimizer_step(run, batches, denominator, lr)
            if not math.isfinite(last_loss):
                raise UserError(f"the loss became {last_loss} at step {step + 1}; lower lr (now {lr:.2g}) or "
                                "check the data; the last good checkpoint is kept")
            now = time.perf_counter()
            run.state["tokens"] += tokens
            run.state["trained_tokens"] += targets
            run.state["elapsed_s"] = now - started
            record = {"split": "train", "step": step + 1, "epoch": epoch, "loss": last_loss, "grad_norm": grad_norm,
                      "lr": lr, "tokens": run.state["tokens"], "trained_tokens": run.state["trained_tokens"],
                      "tokens_per_s": tokens / max(now - step_start, 1e-9), "elapsed_s": run.state["elapsed_s"]}
            logger.log(record)
            progress.update(step + 1, record)
            done = step + 1 == total_steps
            if run.eval_rows and (done or (config.eval_every and (step + 1) % config.eval_every == 0)):
                eval_metrics = evaluate_all(run)
                logger.log({"split": "eval", "step": step + 1, **eval_metrics})
                progress.note(f"step {step + 1}: eval loss {eval_metrics['loss']:.4f}, "
                              f"accuracy {eval_metrics['accuracy']:.1%}")
            if done or (config.save_every and (step + 1) % config.save_every == 0):
                _save(run, step + 1, epoch)
    finally:
        progress.close()
        logger.close()
    if run.start_step >= total_steps:
        console.print(f"the run in {run.output_dir} had already finished ({total_steps} steps)", markup=False)
        eval_metrics = evaluate_all(run) if run.eval_rows else None
    checkpoint = latest_checkpoint(run.output_dir)
    assert checkpoint is not None  # every run has at least one step and saves on its last
    if run.parallel.is_main:
        plot_losses(run.output_dir)
    merged = _write_merged(run) if config.merge_lora and run.parallel.is_main else None
    return TrainResult(run.output_dir, checkpoint, total_steps, last_loss, eval_metrics, merged)


def _write_merged(run: TrainingRun) -> Path:
    """Fold the adapter into the base weights (in place: training is over) and save a plain model."""
    from instructune.lora import merge_lora

    target, tmp = run.output_dir / "merged", run.output_dir / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.model = merge_lora(run.model)
    with quiet_saving():
        run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def train(config: TrainConfig, *, name: str = "default", console=None) -> TrainResult:
    """Set up and run a whole training run; see the module docstring."""
    try:
        return fit(setup_run(config, name=name, console=console), console=console)
    finally:
        shutdown()  # the process group, when this run created it
