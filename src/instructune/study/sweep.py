"""`instructune study`: a sweep over instruction weights x epochs x seeds, from the same start.

Every arm (one seed, one `instruction_weight`) trains from the same initial weights on the same rows
(a data regime's `train.jsonl`), in the order its seed gives, with `train_on: assistant`; only the
weight of the instruction tokens in the loss differs between the arms of a seed. `compare`'s checks
hold across all of them: the rows' tokens, the batches of every step and a hash of the initial
weights are equal, or the study stops.

At the end of every epoch an arm is scored on fixed sets (the same rows and labels for every arm):

- `loss`: response loss on the held-out rows; `train_response_loss`: on a fixed sample of training
  rows (their difference is the generalisation gap);
- `instruction_loss`, `train_instruction_loss`: the same rows labelled on their instruction tokens
  (`data.weights.instruction_labels`, leaving out the prefix every row shares): memorisation of
  instruction patterns.

Each epoch's checkpoint then answers the held-out questions greedily (exact match, contains, ROUGE-L)
and is deleted once answered. Compute comes from the arms' own step records (tokens read, tokens
scored, seconds per step) and from one side-by-side timing of the same batches with and without
instruction labels. Every number is read back from the arms' `metrics.jsonl` and `answers.jsonl`.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from instructune.data.encoded import EncodedRow
from instructune.errors import UserError
from instructune.study.compare import (
    HeldOut,
    _data_signature,
    compute_stats,
    evenly_spaced,
    load_heldout,
    score_answers,
    shared_prefix_length,
    weights_fingerprint,
)
from instructune.study.regimes import RegimeData
from instructune.train.config import TrainConfig

DEFAULT_WEIGHTS = (0.0, 0.01, 0.1, 1.0)
"""The instruction weights the issue and the second paper sweep: masked, two small weights, unmasked."""

SET_KEYS = ("loss", "train_response_loss", "instruction_loss", "train_instruction_loss")
"""The eval record's keys of the four scored sets (`loss` is the held-out response loss)."""

STUDY_SET_BY_THE_STUDY = ("train_on", "instruction_weight", "data", "eval_data", "eval_every", "save_every",
                          "keep_last", "save_optimizer", "max_steps", "resume", "seed")
"""Config keys the study sets itself (per arm); a user override of one is refused."""


@dataclass
class StudyOptions:
    """The sweep's own settings (training settings are ordinary config keys)."""

    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    seeds: tuple[int, ...] = (42,)
    questions: int = 16
    """Held-out questions answered after every epoch (the first ones of the held-out rows)."""
    max_new_tokens: int = 32
    train_sample: int = 32
    """Training rows whose response and instruction losses are tracked (evenly spaced)."""
    timing_pairs: int = 4
    """Steps timed side by side with and without instruction labels (first seed, weight-0 arm); 0: none."""
    generation_batch_size: int = 16
    examples: int = 6
    """Held-out questions shown side by side in the report."""
    keep_checkpoints: bool = False
    """Keep each arm's final checkpoint (without optimizer state); by default every checkpoint is
    deleted once its answers are written."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Regime facts for the summary (`RegimeData.describe()`)."""


def arm_name(seed: int, weight: float) -> str:
    """The arm's folder: `seed42/w0.01`."""
    return f"seed{seed}/w{weight:g}"


def check_weights(weights: tuple[float, ...]) -> tuple[float, ...]:
    """Sorted, distinct weights in [0, 1] with 0 among them (the masked baseline every claim compares to)."""
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad:
        raise UserError(f"--weights must be in [0, 1], got {bad[0]:g}")
    if 0.0 not in weights:
        raise UserError("--weights must include 0: the masked run is the baseline every claim compares to")
    if len(set(weights)) < 2:
        raise UserError("--weights needs at least two weights to compare")
    return tuple(sorted(set(weights)))


def instruction_rows(rows: list[EncodedRow], skip: int) -> list[EncodedRow]:
    """The rows labelled on their instruction tokens (`instruction_labels`) from position `skip` on."""
    from instructune.data.weights import instruction_labels

    return [replace(row, labels=instruction_labels(row, skip)) for row in rows]


def all_scored_rows(rows: list[EncodedRow], skip: int) -> list[EncodedRow]:
    """The rows with every scored position of a weight above 0: responses and instructions (for timing)."""
    return [replace(row, labels=[a if a != -100 else b for a, b in zip(row.labels, other.labels, strict=True)])
            for row, other in zip(rows, instruction_rows(rows, skip), strict=True)]


# ---------------------------------------------------------------------------------------------------
# The sweep

def run_sweep(config: TrainConfig, regime: RegimeData, options: StudyOptions, output: Path,
              console) -> dict[str, Any]:
    """Train every arm, score it after each epoch, and return the study's numbers (see `summarise`)."""
    from instructune.train.loop import evaluate_all, fit, setup_run
    from instructune.train.setup import resolve_device
    from instructune.train.threads import cpu_thread_governor

    started = time.perf_counter()
    weights = check_weights(options.weights)
    # `fit` runs on the cores other processes leave free; scoring, answering and timing outside it should
    # too (two OpenMP threads on a busy core wait for each other at every barrier: 5x slower here).
    governor = cpu_thread_governor(resolve_device(config)[0].type)
    shared: dict[str, Any] = {}
    arms: list[dict[str, Any]] = []
    total = len(options.seeds) * len(weights)
    for seed in options.seeds:
        for weight in weights:
            name = arm_name(seed, weight)
            console.print(f"study: arm {len(arms) + 1} of {total}: seed {seed}, instruction_weight {weight:g}",
                          markup=False)
            arm_config = replace(config, seed=seed, train_on="assistant", instruction_weight=weight,
                                 data=str(regime.train_file), eval_data=str(regime.heldout_file),
                                 output_dir=str(output / name), save_optimizer="none", max_steps=None,
                                 resume=False)
            run = setup_run(arm_config, name=name.replace("/", "-"), console=console)
            _evaluate_every_epoch(run)
            signature, fingerprint = _data_signature(run), weights_fingerprint(run.model)
            if not shared:
                _set_up_shared(run, shared, options, signature, fingerprint, console)
            else:
                _check_same_start(shared, signature, fingerprint, name)
            run.eval_rows, run.eval_sets = shared["eval_rows"], shared["sets"]  # every arm on the same rows
            _govern(governor, console)
            if "before" not in shared:
                console.print("study: scoring and answering with the base model", markup=False)
                shared["before"] = evaluate_all(run)
                shared["before_answers"] = _answers(run, shared["held"], options)
            if options.timing_pairs and "paired" not in shared:
                shared["paired"] = _paired_timing(run, shared["skip"], options.timing_pairs, console)
            result = fit(run, console=console)
            _govern(governor, console)
            answers = _answer_each_epoch(run, result.output_dir, shared["held"], options, console)
            arms.append({"seed": seed, "weight": weight, "name": name, "output_dir": str(run.output_dir),
                         "initial_weights_sha256": fingerprint, "data_sha256": signature,
                         "steps_per_epoch": run.plan.steps_in_epoch(0), "answers_file": str(answers)})
            del run, result
            gc.collect()
    return {"shared": shared, "arms": arms, "weights": weights, "elapsed_s": time.perf_counter() - started}


def _govern(governor, console) -> None:
    """Set the thread count to the free cores (see `train.threads`) before a pass outside `fit`."""
    if governor is not None and (threads := governor.update()) is not None:
        console.print(f"other processes are using the CPU: {threads} thread(s) now", markup=False)


def _evaluate_every_epoch(run) -> None:
    """Evaluate and checkpoint at the end of every epoch (and keep them all until answered)."""
    from instructune.train.config import config_to_yaml

    per_epoch = run.plan.steps_in_epoch(0)
    epochs = run.config.epochs
    if any(run.plan.steps_in_epoch(e) != per_epoch for e in range(epochs)):
        raise UserError("the study needs the same number of steps in every epoch")
    run.config = replace(run.config, eval_every=per_epoch, save_every=per_epoch, keep_last=epochs)
    (run.output_dir / "config.yaml").write_text(config_to_yaml(run.config), encoding="utf-8")


def _set_up_shared(run, shared: dict, options: StudyOptions, signature: dict, fingerprint: str, console) -> None:
    """The first arm fixes what every arm is scored on: eval rows, training sample, instruction labels."""
    from instructune.data.weights import tokenizer_prefix_length

    if not run.eval_rows:
        raise UserError("the study needs held-out rows; none of the held-out file's rows could be encoded")
    sample = evenly_spaced(run.train_rows, options.train_sample)
    skip = max(shared_prefix_length(run.eval_rows + sample), tokenizer_prefix_length(run.tokenizer), 1)
    sets = {"train_response": sample, "instruction": instruction_rows(run.eval_rows, skip),
            "train_instruction": instruction_rows(sample, skip)}
    if not sum(r.num_trained for r in sets["instruction"]):
        raise UserError("the held-out rows have no instruction tokens (plain-text data?): the weight changes nothing")
    held = load_heldout(run.config, _heldout_options(options), run.eval_rows)
    limit = options.questions
    held = HeldOut(held.source, held.conversations[:limit], held.questions[:limit], held.references[:limit],
                   held.answers[:limit])
    # What one epoch sends through the LM head: the responses, plus at a weight above 0 every instruction
    # position the weight scores (`instruction_labels` from the tokenizer's prefix on).
    head = {"responses": sum(r.num_trained for r in run.train_rows),
            "instructions": sum(r.num_trained for r in instruction_rows(run.train_rows,
                                                                         tokenizer_prefix_length(run.tokenizer)))}
    shared.update(config=run.config, signature=signature, fingerprint=fingerprint, eval_rows=run.eval_rows,
                  sets=sets, skip=skip, held=held, train_rows=len(run.train_rows), head_tokens_per_epoch=head,
                  skipped_text=run.tokenizer.decode(run.eval_rows[0].input_ids[:skip]))
    console.print(f"study: {len(run.train_rows)} training rows, {len(run.eval_rows)} held-out rows, "
                  f"{len(held.questions)} questions answered after each epoch", markup=False)


def _heldout_options(options: StudyOptions):
    from instructune.study.compare import CompareOptions

    return CompareOptions(heldout=None, max_new_tokens=options.max_new_tokens,
                          generation_batch_size=options.generation_batch_size)


def _check_same_start(shared: dict, signature: dict, fingerprint: str, name: str) -> None:
    what = {"train": "training rows", "eval": "held-out rows"}
    for key, label in what.items():
        if shared["signature"][key] != signature[key]:
            raise UserError(f"arm {name} would not see the same {label} as the first arm; the study needs "
                            "identical inputs")
    if fingerprint != shared["fingerprint"]:
        raise UserError(f"arm {name} did not start from the first arm's initial weights (a randomly "
                        "initialised adapter or model?); the study needs the same start")


def _paired_timing(run, skip: int, pairs: int, console) -> dict:
    """Forward + backward of the same batches with response labels and with every scored position, in turn."""
    from instructune.study.timing import paired_step_times

    console.print(f"study: timing {pairs} steps with and without instruction labels, alternately", markup=False)
    masked = run.train_rows
    run.train_rows = all_scored_rows(masked, skip)
    try:
        return paired_step_times(run, masked, pairs=pairs)
    finally:
        run.train_rows = masked


def _answers(run, held: HeldOut, options: StudyOptions) -> list[str]:
    from instructune.study.compare import answer_all

    return answer_all(run, held, _heldout_options(options))


def _answer_each_epoch(run, output_dir: Path, held: HeldOut, options: StudyOptions, console) -> Path:
    """Answer the questions with each epoch's checkpoint, write `answers.jsonl`, then delete the checkpoints."""
    from safetensors.torch import load_file

    from instructune.train.checkpoint import OPTIMIZER_FILE

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    path = output_dir / "answers.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for epoch, checkpoint in enumerate(checkpoints, 1):
            state = load_file(str(checkpoint / "model.safetensors"))
            missing, unexpected = run.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if getattr(run.model.config, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise UserError(f"{checkpoint}: its weights do not fit the model (missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]})")
            answers = _answers(run, held, options)
            step = int(checkpoint.name.split("-")[1])
            out.write(json.dumps({"epoch": epoch, "step": step, "answers": answers}, ensure_ascii=False) + "\n")
            console.print(f"study: epoch {epoch} answered", markup=False)
    last = checkpoints[-1]
    for checkpoint in checkpoints:
        if checkpoint == last and options.keep_checkpoints:
            (checkpoint / OPTIMIZER_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(checkpoint)
    return path


# ---------------------------------------------------------------------------------------------------
# Numbers out of the arms' files

def epoch_records(records: list[dict], steps_per_epoch: int) -> list[dict]:
    """The eval records at the end of each epoch, with the four set losses and the gap."""
    rows = []
    for r in records:
        if r.get("split") != "eval" or r["step"] % steps_per_epoch:
            continue
        rows.append({"epoch": r["step"] // steps_per_epoch, "step": r["step"],
                     "response_loss": r["loss"], "response_accuracy": r["accuracy"],
                     "train_response_loss": r["train_response_loss"],
                     "gap": r["loss"] - r["train_response_loss"],
                     "instruction_loss": r["instruction_loss"],
                     "train_instruction_loss": r["train_instruction_loss"],
                     "instruction_gap": r["instruction_loss"] - r["train_instruction_loss"]})
    return rows


def summarise(config: TrainConfig, regime: RegimeData, options: StudyOptions, swept: dict) -> dict[str, Any]:
    """Every number of the study as plain JSON data; the arms' numbers are read from their files."""
    from instructune.train.metrics import read_metrics

    shared, held = swept["shared"], swept["shared"]["held"]
    before = shared["before"]
    summary: dict[str, Any] = {
        "settings": {**{k: v for k, v in shared["config"].to_dict().items()
                        if k not in ("instruction_weight", "output_dir", "seed")},
                     "output_dir": config.output_dir, "weights": list(swept["weights"]),
                     "seeds": list(options.seeds), "questions": len(held.questions),
                     "max_new_tokens": options.max_new_tokens, "examples": options.examples},
        "regime": regime.describe(),
        "eval": {"rows": len(shared["eval_rows"]), "train_rows": shared["train_rows"],
                 "response_tokens": sum(r.num_trained for r in shared["eval_rows"]),
                 "instruction_tokens": sum(r.num_trained for r in shared["sets"]["instruction"]),
                 "train_sample_rows": len(shared["sets"]["train_response"]),
                 "train_sample_response_tokens": sum(r.num_trained for r in shared["sets"]["train_response"]),
                 "train_sample_instruction_tokens": sum(r.num_trained for r in shared["sets"]["train_instruction"]),
                 "shared_prefix_tokens": shared["skip"], "shared_prefix_text": shared["skipped_text"]},
        "before": {"response_loss": before["loss"], "response_accuracy": before["accuracy"],
                   "train_response_loss": before["train_response_loss"],
                   "gap": before["loss"] - before["train_response_loss"],
                   "instruction_loss": before["instruction_loss"],
                   "train_instruction_loss": before["train_instruction_loss"],
                   "instruction_gap": before["instruction_loss"] - before["train_instruction_loss"],
                   "generation": score_answers(held, shared["before_answers"])},
        "arms": [],
    }
    for arm in swept["arms"]:
        records = read_metrics(arm["output_dir"])
        epochs = epoch_records(records, arm["steps_per_epoch"])
        with open(arm["answers_file"], encoding="utf-8") as lines:
            answered = [json.loads(line) for line in lines]
        for row, answers in zip(epochs, answered, strict=True):
            row["generation"] = score_answers(held, answers["answers"])
        compute = compute_stats(records)
        head = shared["head_tokens_per_epoch"]
        compute["head_tokens_per_step"] = (head["responses"] + (head["instructions"] if arm["weight"] else 0)) / \
            arm["steps_per_epoch"]
        summary["arms"].append({**{k: arm[k] for k in ("seed", "weight", "name", "output_dir", "steps_per_epoch",
                                                       "initial_weights_sha256")},
                                "epochs": epochs, "final_answers": answered[-1]["answers"],
                                "compute": {k: v for k, v in compute.items() if k not in ("step_s", "trained_tokens")}})
    first = swept["arms"][0]
    summary["checks"] = {
        "same_initial_weights": all(a["initial_weights_sha256"] == first["initial_weights_sha256"]
                                    for a in swept["arms"]),
        "same_rows": all(a["data_sha256"]["train"] == first["data_sha256"]["train"] for a in swept["arms"]),
        "same_order_within_seed": all(a["data_sha256"]["steps"] == b["data_sha256"]["steps"]
                                      for a in swept["arms"] for b in swept["arms"] if a["seed"] == b["seed"]),
        "same_eval_rows": all(a["data_sha256"]["eval"] == first["data_sha256"]["eval"] for a in swept["arms"])}
    summary["paired_timing"] = shared.get("paired")
    summary["answers"] = [{"question": q, "reference": r, "answer": a, "before": b} for q, r, a, b in
                          zip(held.questions, held.references, held.answers, shared["before_answers"], strict=True)]
    summary["elapsed_s"] = swept["elapsed_s"]
    return summary
