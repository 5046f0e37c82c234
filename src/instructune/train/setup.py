"""Setting up a training run: output folder, data, model, optimizer, and the checkpoint to resume from.

`setup_run` does everything before the first optimizer step and returns a `TrainingRun`, which
`train.fit` runs. Every rank of a distributed run calls it; rank 0 alone prepares the output folder and
writes the resolved config, and the other ranks of a machine read the caches its first rank wrote.
"""

from __future__ import annotations

import importlib.util
import random
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from instructune.data.encoded import EncodedRow
from instructune.data.shards import row_lengths, select_rows
from instructune.data.templates import check_template_choice
from instructune.errors import UserError
from instructune.model.varlen_attention import takes_row_boundaries, use_varlen_attention
from instructune.train.checkpoint import (
    CONFIG_FILE,
    check_checkpoint,
    incomplete_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    remove_leftovers,
    restore_rng,
)
from instructune.train.config import (
    DEFAULT_WARMUP_FRACTION,
    FIELD_NAMES,
    TrainConfig,
    config_from_dict,
    save_config,
)
from instructune.train.distributed import Parallel, init_distributed
from instructune.train.memory_budget import resolve_tokens_per_forward
from instructune.train.metrics import METRICS_FILE
from instructune.train.optim import build_optimizer, default_warmup_steps
from instructune.train.precision import resolve_precision, weight_dtype
from instructune.train.step_plan import StepPlan
from instructune.train.training_data import check_data

RUN_FILES = ("config.yaml", METRICS_FILE, "loss.png", "tensorboard", "merged")
"""What a run writes into its output folder besides checkpoints (removed by `overwrite: true`)."""


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
    created_folders: list[Path] = field(default_factory=list)
    """The folders setup created for `output_dir` (rank 0), which a run that fails before writing
    anything worth keeping removes again (`remove_unused_output`)."""


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device and the weight dtype of `config.precision` there (bf16 only for bf16-true; see
    `instructune.train.precision`)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    return device, weight_dtype(resolve_precision(config.precision, device))


def _prepare_output_dir(config: TrainConfig, output_dir: Path, console) -> Path | None:
    """Make the output folder ready; return the checkpoint to resume from, if any."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir)
    latest = latest_checkpoint(output_dir)
    if config.resume:
        for folder in incomplete_checkpoints(output_dir, after=latest):
            console.print(f"note: {folder} has no COMPLETE marker (its writing was interrupted, or it was copied in "
                          "part): it is not resumed from", markup=False)
        if latest is not None:
            check_checkpoint(latest)  # a file cut short or damaged since: refused before anything loads it
        if latest is None:
            console.print(f"resume: no complete checkpoint in {output_dir}, starting from the beginning")
        return latest
    has_run = latest is not None or (output_dir / METRICS_FILE).exists()
    if has_run and not config.overwrite:
        held = f" ({latest.name})" if latest is not None else ""
        raise UserError(
            f"{output_dir} already holds a run{held}; add resume=true to the command to continue it, "
            f"overwrite=true to start it again (its checkpoints are deleted), or output_dir={_free_name(output_dir)} "
            "for a new run")
    if has_run:
        for entry in output_dir.iterdir():
            if entry.name.startswith("checkpoint-") or entry.name in RUN_FILES:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return None


def _free_name(output_dir: Path) -> str:
    """A sibling of `output_dir` that does not exist yet (`runs/default-2`), to suggest."""
    number = 2
    while output_dir.with_name(f"{output_dir.name}-{number}").exists():
        number += 1
    return str(output_dir.with_name(f"{output_dir.name}-{number}"))


def new_folders(path: Path) -> list[Path]:
    """The folders `path.mkdir(parents=True)` would create, `path` first (empty when it exists)."""
    missing, path = [], Path(path).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_unused_output(created: list[Path]) -> bool:
    """After a failed run: remove the folders it created (`new_folders` before it started) when they hold
    nothing worth keeping: no checkpoint (complete or not), no metrics row, no merged model, nothing the
    run did not write itself. A folder that existed before is never touched. Returns whether it removed them."""
    if not created or not created[0].is_dir():
        return False
    output_dir = created[0]
    for entry in output_dir.iterdir():
        if entry.name.startswith("checkpoint-") or entry.name in ("merged", "heldout_answers.jsonl"):
            return False
        if entry.name == METRICS_FILE:
            try:
                if entry.read_text(encoding="utf-8").strip():
                    return False
            except (OSError, UnicodeDecodeError):
                return False
        elif entry.name not in RUN_FILES:
            return False
    shutil.rmtree(output_dir, ignore_errors=True)
    for parent in created[1:]:  # the parents it created, as long as nothing else was put in them
        try:
            parent.rmdir()
        except OSError:
            break
    return not output_dir.exists()


@contextmanager
def removed_if_unused(run: TrainingRun) -> Iterator[None]:
    """Around the steps of `run`: when they fail, remove the output folders setup created if nothing worth
    keeping was written there yet (see `remove_unused_output`); the error goes on."""
    try:
        yield
    except BaseException:
        if run.parallel.is_main:
            remove_unused_output(run.created_folders)
        raise


def _split_rows(rows: list[EncodedRow], config: TrainConfig) -> tuple[list[EncodedRow], list[EncodedRow]]:
    """Hold out `eval_fraction` of the rows (chosen by the seed alone) for evaluation."""
    if config.eval_fraction == 0 or len(rows) < 2:
        return rows, []
    count = min(max(1, round(len(rows) * config.eval_fraction)), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(f"instructune-split-{config.seed}").shuffle(order)
    held = set(order[:count])
    # Positions, not rows: memory-mapped rows (a cached preparation) stay on disk as views.
    return (select_rows(rows, [i for i in range(len(rows)) if i not in held]),
            select_rows(rows, [i for i in range(len(rows)) if i in held]))


def prepare_splits(config: TrainConfig, tokenizer, console) -> tuple[list[EncodedRow], list[EncodedRow], str]:
    """Encode the training (and evaluation) data; returns (train rows, eval rows, template text)."""
    from instructune.data.prepare import prepare_dataset, require_kept_rows
    from instructune.train.training_data import prepare_config_mixture, uses_mixture

    if uses_mixture(config):  # several sources (or dedupe): train/training_data.py
        splits = prepare_config_mixture(config, tokenizer, console)
        return splits.mixture.train_rows, splits.eval_rows, splits.mixture.template

    prepared = prepare_dataset(config.data, tokenizer, config.encoding, num_proc=config.num_proc)
    _print_report(console, config.data, prepared.report)
    require_kept_rows(config.data, prepared.report, _inspect_hint(config, config.data))
    if config.eval_data:
        evaluation = prepare_dataset(config.eval_data, tokenizer, config.encoding, num_proc=config.num_proc)
        _print_report(console, config.eval_data, evaluation.report)
        require_kept_rows(config.eval_data, evaluation.report, _inspect_hint(config, config.eval_data))
        return prepared.rows, evaluation.rows, prepared.template
    train_rows, eval_rows = _split_rows(prepared.rows, config)
    return train_rows, eval_rows, prepared.template


def _inspect_hint(config: TrainConfig, data: str) -> str:
    """The `instructune inspect` command that shows how this run's settings encode `data`, row by row."""
    from instructune.data.prepare import encoding_flags

    flags = encoding_flags(config.encoding)
    tokenizer = config.tokenizer or config.model
    return f"`instructune inspect {shlex.quote(str(data))} --tokenizer {shlex.quote(str(tokenizer))}{flags}` shows why"


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
    from instructune.model.load import load_model

    full_checkpoint = resume_from is not None and config.lora is None
    source = str(resume_from) if full_checkpoint else config.model
    model = load_model(source, device=str(device), dtype=dtype, trust_remote_code=config.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a built-in template added its markers
    # Saved checkpoints then stop `generate` at the end of a turn, not only at EOS.
    model.generation_config.eos_token_id = end_of_turn_token_ids(tokenizer, template)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if (config.padding_free or config.packing) and uses_flash_attention(device, config.precision):
        # Padding-free rows: the loss hands flash-attention the row boundaries (varlen kernel), so no
        # mask is built at all.
        model.set_attn_implementation("flash_attention_2")
    elif config.padding_free or config.packing:
        # Rows concatenated without padding; attention per row from the boundaries (varlen_attention.py,
        # batched SDPA on any device).
        use_varlen_attention(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora is not None:
        from instructune.model.lora import apply_lora

        model = apply_lora(model, config.lora)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
        if resume_from is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_from / "adapter_model.safetensors"),
                                                       device=str(device)))
    if config.fused_layers:
        from instructune.model.fused_layers import apply_fused_layers

        apply_fused_layers(model)  # after LoRA, which it sees: an MLP with an adapter on down_proj is left alone
    model.train()
    return model


def uses_flash_attention(device: torch.device, precision: str) -> bool:
    """Whether padding-free rows go through flash-attention's varlen kernel: on CUDA, in a bf16 mode (its
    kernels take no fp32), when `flash_attn` is installed; otherwise they go through SDPA."""
    return (device.type == "cuda" and resolve_precision(precision, device) != "fp32"
            and importlib.util.find_spec("flash_attn") is not None)


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

    console = console or Console(highlight=False, soft_wrap=True)
    if not config.data:
        raise UserError("'data' is not set: give the training data in the config or as data=PATH")
    check_data(config)  # a mixture's sources exist and its column mappings fit, before anything is loaded
    check_template_choice(config.template)  # a broken template file stops the run before anything is written
    config = resolve_config(config, name)
    output_dir = Path(config.output_dir)
    device, dtype = resolve_device(config)
    config = replace(config, precision=resolve_precision(config.precision, device))  # auto: chosen by the device
    parallel = init_distributed(config, device)
    device, console = parallel.device, console if parallel.is_main else Console(quiet=True)
    # The data before the output folder: a bad or empty file is the problem to report, even where the
    # folder already holds a run (which would otherwise be the first error, and the data's only on a retry).
    data = _prepare_data(config, parallel, console)
    created: list[Path] = []  # on rank 0: the folders this run creates, removed again if it fails unused

    def prepare_output() -> Path | None:
        created.extend(new_folders(output_dir))
        return _prepare_output_dir(config, output_dir, console)

    resume_from = parallel.on_main(prepare_output)
    try:
        run = _setup_in(config, name, output_dir, device, dtype, parallel, console, resume_from, data)
    except BaseException:
        remove_unused_output(created)
        raise
    run.created_folders = created
    return run


@dataclass
class _PreparedData:
    """The tokenizer and the encoded rows, made before the output folder is touched."""

    tokenizer: object
    train_rows: list[EncodedRow]
    eval_rows: list[EncodedRow]
    template: str


def _prepare_data(config: TrainConfig, parallel: Parallel, console) -> _PreparedData:
    """Load the tokenizer and encode the data; a `UserError` when there is nothing to train on."""
    from instructune.model.load import load_tokenizer

    # Seeded first, as before the data moved ahead of the output folder: whatever draws from here on
    # draws the same numbers.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    with parallel.local_main_first():  # it converts and encodes once; the others read its caches
        tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
        train_rows, eval_rows, template = prepare_splits(config, tokenizer, console)
    if not train_rows:
        raise UserError(f"{config.data}: no row left to train on")
    return _PreparedData(tokenizer, train_rows, eval_rows, template)


def _setup_in(config: TrainConfig, name: str, output_dir: Path, device: torch.device, dtype: torch.dtype,
              parallel: Parallel, console, resume_from: Path | None, data: _PreparedData) -> TrainingRun:
    """`setup_run` once the data is encoded and the output folder ready: model, optimizer, the checkpoint."""
    tokenizer, train_rows, eval_rows, template = data.tokenizer, data.train_rows, data.eval_rows, data.template
    tokenizer.chat_template = template  # checkpoints chat with the template they were trained with
    plan = StepPlan(row_lengths(train_rows), config, world_size=parallel.world_size, rank=parallel.rank)
    config = resolve_config(config, name, plan.total_steps())  # the plan reads no key this changes

    # FSDP loads the full weights into CPU memory; sharding then moves each rank's shards to its GPU.
    model = build_model(config, tokenizer, template, torch.device("cpu") if parallel.sharded else device, dtype,
                        resume_from)
    # The token budget of a forward pass, counted as the batches will be laid out (see loop.collate_rows).
    plan.padded = not (config.packing or (config.padding_free and takes_row_boundaries(model)))
    plan.tokens_per_forward = resolve_tokens_per_forward(config.max_tokens_per_forward, model, device,
                                                         lean_layers=config.fused_layers, broadcast=parallel.broadcast)
    if config.max_tokens_per_forward is None:
        console.print(f"forward passes of at most {plan.tokens_per_forward:,} tokens (from free memory; "
                      "set max_tokens_per_forward to choose)", markup=False)
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
        # As saved, paths and all (read as a file, its relative paths would be taken from the checkpoint's folder).
        values = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        saved = config_from_dict(values if isinstance(values, dict) else {}, origin=str(checkpoint / CONFIG_FILE))
    except (UserError, OSError, yaml.YAMLError):  # written by another version; nothing to compare against
        return
    ignored = {"resume", "overwrite", "log_every", "distributed", "dist_timeout_s", "save_optimizer"}  # same results
    changed = [f"{key} (was {getattr(saved, key)!r}, now {getattr(config, key)!r})" for key in FIELD_NAMES
               if key not in ignored and getattr(saved, key) != getattr(config, key)]
    if changed:
        console.print("note: settings changed since the checkpoint: " + "; ".join(changed), markup=False)
