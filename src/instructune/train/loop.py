"""The training loop: run optimizer steps over a prepared run, evaluate, checkpoint.

`run_setup.setup_run` does everything before the first step (data, model, optimizer, resume) and
`fit` runs the steps; `train` is the two together. One optimizer step:

1. take the step's micro-batches, a pure function of (seed, epoch, step) (`step_plan.StepPlan`), so a
   resumed run trains on exactly the batches the interrupted one would have;
2. count the step's targets once, over all its micro-batches and ranks (`step_plan.step_counts`, one
   all-reduce);
3. for each micro-batch: the selective-head loss *sum* divided by that count, backward; with a token
   budget (`max_tokens_per_forward`), a micro-batch runs as several forward passes of whole rows, and
   a row longer than the budget recomputes its activations in backward (`recompute.recomputing`);
4. clip, set the scheduled learning rate, AdamW step; one host sync to read the loss.

SIGTERM or SIGINT while the steps run ends the run after the current step, with a checkpoint of it
(`instructune.train.stopping`); a second signal ends it at once.

Several ranks (`torchrun`, see `instructune.train.distributed`): the step's micro-batches are the same as on
one process, and each rank trains on its share of every one; DDP or FSDP2 sums the gradients. Rank 0
alone prints, writes metrics and checkpoints; every rank evaluates its share of the eval rows.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructune.data.batching import collate_packed, collate_padded, pad_token_id
from instructune.data.encoded import EncodedRow
from instructune.data.shards import row_lengths
from instructune.data.weights import tokenizer_prefix_length
from instructune.errors import UserError
from instructune.model.fused_layers import recomputed_norm_outputs
from instructune.model.varlen_attention import takes_row_boundaries
from instructune.train.checkpoint import latest_checkpoint, load_trainer_state, quiet_saving, save_checkpoint
from instructune.train.config import TrainConfig, config_to_yaml
from instructune.train.distributed import NoMetrics, shutdown, without_targets
from instructune.train.loss import recycle_head_gradient, row_mean_sum
from instructune.train.metrics import MetricsLogger, ProgressReporter, plot_losses, read_metrics
from instructune.train.optim import grad_norm, lr_at, set_lr
from instructune.train.precision import autocast
from instructune.train.recompute import recomputing
from instructune.train.setup import TrainingRun, removed_if_unused, setup_run
from instructune.train.step_plan import step_counts
from instructune.train.stopping import GracefulStop, TrainingStopped, resume_command
from instructune.train.threads import cpu_thread_governor
from instructune.train.trackers import require_trackers

__all__ = ["TrainResult", "TrainingRun", "collate_rows", "evaluate", "evaluate_all", "fit", "setup_run", "train"]


def collate_rows(run: TrainingRun, rows: list[EncodedRow]) -> dict[str, torch.Tensor]:
    """A training micro-batch: one padding-free sequence when packing or when the attention takes row
    boundaries (`padding_free`), else rows padded to the longest."""
    pad = pad_token_id(run.tokenizer)
    flat = run.config.packing or (run.config.padding_free and takes_row_boundaries(run.model))
    collate = collate_packed if flat else collate_padded
    if not run.config.instruction_weight:
        return collate(rows, pad)
    # Instruction targets too (docs/masking.md, "Instruction weight"); the tokenizer's BOS never is one.
    return collate(rows, pad, instruction_weight=run.config.instruction_weight,
                   prefix_length=tokenizer_prefix_length(run.tokenizer))


def _collate(run: TrainingRun, indices: list[int]) -> dict[str, torch.Tensor]:
    if not indices:  # this rank's share of the micro-batch is empty: a row without targets keeps it in step
        filler = without_targets(_collate(run, [run.plan.filler_row]))
        filler.pop("instruction_labels", None)  # no instruction targets either: the share is an exact zero
        return filler
    return collate_rows(run, [run.train_rows[i] for i in indices])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(run: TrainingRun, eval_rows: list[EncodedRow] | None = None) -> dict[str, float]:
    """Loss over the labelled tokens (token-normalised) and next-token accuracy; default: the eval rows."""
    eval_rows = run.eval_rows if eval_rows is None else eval_rows
    run.model.eval()
    pad = pad_token_id(run.tokenizer)
    lengths = row_lengths(eval_rows)  # memory-mapped rows are not built just to be measured
    order = sorted(range(len(eval_rows)), key=lengths.__getitem__)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct, targets = 0, 0
    size, parallel = run.config.batch_size, run.parallel
    # Rank r scores every world_size-th batch; a rank left without one scores a row without targets, so
    # that all ranks run as many forwards (FSDP all-gathers in each).
    for first in range(0, len(order), size * parallel.world_size):
        rows = [eval_rows[i] for i in order[first + parallel.rank * size:first + (parallel.rank + 1) * size]]
        batch = collate_padded(rows or [eval_rows[order[0]]], pad)
        with autocast(run.config.precision, run.device):
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


def accumulate_gradients(run: TrainingRun, batches: list[dict[str, torch.Tensor]], denominator: float,
                         recompute: list[bool] | None = None, parts: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward over the step's forward passes, each loss sum divided by the step's
    `denominator`; `recompute[i]`: forward i checkpoints its activations. Returns this rank's loss.

    With an instruction weight, `parts` ([2], on the device) receives this rank's unweighted sums of
    -log p over the response targets and over the instruction targets (for their separate curves)."""
    config = run.config
    # Only with a weight is the option passed at all: w = 0 runs the masked loss exactly as before.
    options = {"instruction_weight": config.instruction_weight} if config.instruction_weight else {}
    total = torch.zeros((), device=run.device)
    for index, batch in enumerate(batches):
        batch = _to_device(batch, run.device)
        sync = index == len(batches) - 1  # DDP sums the ranks' gradients once, in the last backward
        with (recomputing(run.model, bool(recompute and recompute[index])), lean_norm_outputs(run),
              autocast(config.precision, run.device)):  # bf16-mixed: bf16 products, the loss in fp32
            out = run.parallel.loss(batch, sync=sync, per_row=config.loss_normalization != "token", **options)
            loss = (out.loss_sum if config.loss_normalization == "token" else row_mean_sum(out)) / denominator
        loss.backward()
        total += loss.detach()
        if parts is not None and out.response_loss_sum is not None:
            parts += torch.stack([out.response_loss_sum, out.instruction_loss_sum]).to(parts)
    return total


def lean_norm_outputs(run: TrainingRun):
    """Norm outputs recomputed in backward instead of kept (`fused_layers.recomputed_norm_outputs`), with
    the lean layers and unsharded weights (FSDP frees a layer's gathered weights between its passes)."""
    if run.config.fused_layers and not run.parallel.sharded:
        return recomputed_norm_outputs()
    return contextlib.nullcontext()


def _optimizer_step(run: TrainingRun, batches: list[dict[str, torch.Tensor]], denominator: float,
                    lr: float, recompute: list[bool] | None = None,
                    parts: list[float] | None = None, stop: list[float] | None = None) -> tuple[float, float]:
    """One optimizer step over `batches`; returns (loss, grad norm before clipping). With an instruction
    weight, `parts` (a list) receives the step's summed response and instruction -log p, all ranks.
    `stop` ([1.0] when this rank was asked to stop, else [0.0]) is summed over the ranks in place, in the
    step's one all-reduce, so that every rank decides the same."""
    config = run.config
    set_lr(run.optimizer, lr)
    sums = torch.zeros(2, device=run.device) if config.instruction_weight and parts is not None else None
    total = accumulate_gradients(run, batches, denominator, recompute, sums)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.parallel.sharded:  # FSDP: torch's clipping knows how to reduce the norm over the shards
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf, foreach=True)
    else:
        norm = _clip(run.optimizer, params, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.grad_scale = None
    recycle_head_gradient(run.model)  # its memory stays mapped for the next step's head
    run.optimizer.zero_grad(set_to_none=True)
    extra = list(stop or [])
    if sums is not None:  # the parts ride along in the same single all-reduce
        loss, *summed = run.parallel.sum(total, *sums, *extra)
        parts[:] = summed[:2]
    else:
        loss, *summed = run.parallel.sum(total, *extra)  # the step's one host sync (and all-reduce of the loss)
    if stop:
        stop[:] = summed[-1:]
    return loss, float(norm)


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


def _save(run: TrainingRun, step: int, epoch: int, *, pending_eval: bool = False) -> None:
    """Write the checkpoint of `step` (rank 0; the others wait). `pending_eval`: the evaluation due at this
    step was skipped (a stop), and the resumed run does it first."""
    model_state, optimizer_state = run.parallel.gather_state(run.optimizer)  # FSDP: from every rank's shards
    if run.parallel.is_main:
        save_checkpoint(run.output_dir, step, model=run.model, tokenizer=run.tokenizer,
                        config_yaml=config_to_yaml(run.config), optimizer=run.optimizer,
                        state={**run.state, "epoch": epoch, "total_steps": run.plan.total_steps(),
                               "world_size": run.parallel.world_size, "pending_eval": pending_eval},
                        keep_last=run.config.keep_last, model_state=model_state, optimizer_state=optimizer_state,
                        save_optimizer=run.config.save_optimizer)
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
    gguf: Path | None = None
    """The GGUF file written at the end (`export_gguf`), or None."""

    @property
    def metrics(self) -> list[dict]:
        """Every record of the run's `metrics.jsonl` (one per optimizer step and per evaluation, told
        apart by `split`), read from the file."""
        return read_metrics(self.output_dir)


def fit(run: TrainingRun, *, console=None, start_eval: dict[str, float] | None = None) -> TrainResult:
    """Run the optimizer steps from `run.start_step` to the end, evaluating and saving on schedule.

    `start_eval`: the evaluation of the model before its first step (from `evaluate`), logged as step 0
    of a run that starts from the beginning, so that `loss.png` shows where the eval loss started."""
    from rich.console import Console

    console = (console or Console(highlight=False, soft_wrap=True)) if run.parallel.is_main else Console(quiet=True)
    config, total_steps = run.config, run.plan.total_steps()
    resume_step = run.start_step if run.resumed_from else None
    logger = (MetricsLogger(run.output_dir, resume_step=resume_step, report_to=config.report_to,
                            config=config.to_dict()) if run.parallel.is_main else NoMetrics())
    for tracker in getattr(logger, "trackers", ()):  # rank 0 alone reports (NoMetrics has none)
        console.print(tracker.note, markup=False, highlight=False)
    if start_eval is not None and run.start_step == 0:
        logger.log({"split": "eval", "step": 0, **start_eval})
    if run.resumed_from and run.eval_rows and load_trainer_state(run.resumed_from).get("pending_eval"):
        logger.log({"split": "eval", "step": run.start_step, **evaluate_all(run)})  # skipped by the stop
    progress = ProgressReporter(console, total_steps, run.start_step, run.state["tokens"], config.log_every)
    last_loss, eval_metrics, epoch = None, None, 0
    started = time.perf_counter() - run.state["elapsed_s"]
    governor = cpu_thread_governor(run.device.type)  # fewer threads while other processes share the cores
    stop = GracefulStop(quiet=not run.parallel.is_main)
    try:
        stop.install()
        for step in range(run.start_step, total_steps):
            if governor is not None and (threads := governor.update()) is not None:
                console.print(f"other processes are using the CPU: {threads} thread(s) now", markup=False)
            step_start = time.perf_counter()
            epoch, groups, recompute = run.plan.step_forwards(step)
            batches = [_collate(run, group) for group in groups]
            tokens = sum(run.plan.lengths[i] for group in groups for i in group)
            denominator, targets, tokens, instruction = step_counts(
                batches, config.loss_normalization, tokens, run.parallel, config.instruction_weight)
            run.parallel.seed_step(config.seed, step)
            lr = lr_at(step, peak=config.lr, total_steps=total_steps, warmup_steps=config.warmup_steps,
                       schedule=config.schedule)
            parts: list[float] = []
            asked = [1.0 if stop.requested else 0.0]  # every rank's, summed in the step's all-reduce
            last_loss, grad_norm = _optimizer_step(run, batches, denominator, lr, recompute, parts, asked)
            stopping = asked[0] > 0 or (run.parallel.world_size == 1 and stop.requested is not None)
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
            if parts:  # instruction weight: `loss` is the weighted one; these two stay comparable across weights
                run.state["instruction_tokens"] = run.state.get("instruction_tokens", 0) + instruction
                record.update(response_loss=parts[0] / max(targets, 1), instruction_loss=parts[1] / max(instruction, 1),
                              instruction_tokens=run.state["instruction_tokens"])
            logger.log(record)
            progress.update(step + 1, record)
            done = step + 1 == total_steps
            stopping = stopping and not done  # the last step: the run ends as it would anyway
            eval_due = bool(run.eval_rows) and (done or bool(config.eval_every and (step + 1) % config.eval_every == 0))
            if eval_due and not stopping:  # a stop skips it (time matters then); the resumed run does it first
                eval_metrics = evaluate_all(run)
                logger.log({"split": "eval", "step": step + 1, **eval_metrics})
                progress.note(f"step {step + 1}: eval loss {eval_metrics['loss']:.4f}, "
                              f"accuracy {eval_metrics['accuracy']:.1%}")
            if stopping or done or (config.save_every and (step + 1) % config.save_every == 0):
                _save(run, step + 1, epoch, pending_eval=stopping and eval_due)
            if stopping:
                _stopped(run, stop, step + 1, total_steps)
    finally:
        stop.restore()
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
    gguf = _export_gguf(config, checkpoint, console) if config.export_gguf and run.parallel.is_main else None
    return TrainResult(run.output_dir, checkpoint, total_steps, last_loss, eval_metrics, merged, gguf)


def _stopped(run: TrainingRun, stop: GracefulStop, step: int, total_steps: int) -> None:
    """Raise `TrainingStopped` after the checkpoint of `step`, saying how to resume."""
    checkpoint = latest_checkpoint(run.output_dir) or run.output_dir
    why = stop.requested or "a signal on another rank"
    raise TrainingStopped(f"stopped by {why} after step {step} of {total_steps}; checkpoint saved in {checkpoint}\n"
                          f"to continue: {resume_command()}", step=step, checkpoint=checkpoint)


def _export_gguf(config: TrainConfig, checkpoint: Path, console) -> Path:
    """Write the final checkpoint as `export_gguf`, read back from disk as `instructune export` does (a LoRA
    adapter merged into its base), so the file is the same whichever way it was made."""
    from instructune.model.export import export_gguf

    out = export_gguf(str(checkpoint), config.export_gguf, kind=config.export_gguf_type, overwrite=True)
    console.print(f"GGUF ({config.export_gguf_type}) written to {out}", markup=False)
    return out


def _write_merged(run: TrainingRun) -> Path:
    """Fold the adapter into the base weights (in place: training is over) and save a plain model."""
    from instructune.model.lora import merge_lora

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
        require_trackers(config.report_to)  # a missing tracker library stops the run before any work
        if config.export_gguf and not (config.overwrite or config.resume):
            from instructune.model.export import check_output

            check_output(config.export_gguf, overwrite=False)  # refuse before training, not after it
        run = setup_run(config, name=name, console=console)
        with removed_if_unused(run):  # a run that fails before its first checkpoint leaves no empty folder
            return fit(run, console=console)
    finally:
        shutdown()  # the process group, when this run created it
