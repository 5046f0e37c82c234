"""`instructune compare`: the masked-vs-unmasked study.

Two runs from the same initial weights, data, row order and seed: **masked** (`train_on: assistant`)
and **unmasked** (`train_on: all`). Their training rows have the same `input_ids` and differ only in
their labels; the study checks that (rows, batches of every step, a hash of the initial weights) and
stops when it does not hold. Both runs are scored on the *same* evaluation rows at every evaluation:

- response loss: the eval rows encoded under the masked policy (the unmasked run's own eval rows,
  labelled on every token, are replaced by these);
- instruction loss: the same rows labelled on their instruction tokens instead (`instruction_rows`);
- instruction loss on a fixed sample of *training* rows: does the unmasked run memorise the prompts
  it was trained on, beyond what carries over to held-out ones?

After each run (and once for the base model) the held-out questions are answered greedily and scored
with exact match, contains-the-answer and ROUGE-L. Every number comes from the runs' `metrics.jsonl`
files; `compare_report` turns them into `summary.json`, `report.md` and the plots.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from instructune import IGNORE_INDEX
from instructune.data.encoded import ROLE_CODE, EncodedRow
from instructune.errors import UserError
from instructune.train.config import TrainConfig, load_config

RUNS = (("masked", "assistant"), ("unmasked", "all"))
"""The two runs of the study: (folder name, `train_on`)."""

COMPARE_SETTINGS = {"epochs": 1, "eval_every": 10, "save_every": 0, "keep_last": 1, "log_every": 10}
"""What the default study sets on top of the default job's settings: one epoch (57 steps), an evaluation
every 10 steps (each scores three sets of about 60 rows), only the final checkpoint. Measured end to end
at 9.9 minutes on 2 CPU cores that other jobs were using too."""

DEFAULT_OUTPUT = "runs/compare"

INSTRUCTION_ROLES = frozenset(ROLE_CODE[name] for name in ("system", "user", "tool"))

TRAIN_PROMPT_ROWS = 64
"""Training rows whose instruction loss is tracked (evenly spaced over the training set)."""


@dataclass
class CompareOptions:
    """The study's own settings (the training settings are ordinary config keys)."""

    heldout: str | None = None
    """Questions to answer before and after training; None: `eval_data`, else the eval split of `data`."""
    max_new_tokens: int = 32
    """Long enough for the one-sentence answers of the built-in held-out set."""
    examples: int = 8
    """Held-out questions shown side by side in the report."""
    generation_batch_size: int = 16
    timing_pairs: int = 6
    """Steps timed with both label sets side by side (`compare_timing`); 0: none."""


# ---------------------------------------------------------------------------------------------------
# Configuration

def compare_config(config_path: str | None, overrides: list[str]) -> TrainConfig:
    """The configuration both runs share: the default study's, or CONFIG.yaml's, with the overrides."""
    from instructune.study.default_job import DEFAULT_JOB_SETTINGS, dataset_file

    keys = {text.partition("=")[0].strip() for text in overrides}
    if "train_on" in keys:
        raise UserError("command line: 'train_on' cannot be set: the study trains one run with "
                        "train_on=assistant and one with train_on=all")
    if config_path is None:
        base = {**DEFAULT_JOB_SETTINGS, **COMPARE_SETTINGS, "data": str(dataset_file("train.jsonl"))}
        if "data" not in keys:  # other data without eval_data: hold out part of it, not the built-in questions
            base["eval_data"] = str(dataset_file("heldout.jsonl"))
        config = load_config(None, overrides, base=base, base_origin="compare default")
    else:
        config = load_config(config_path, overrides)
    if config.resume:
        raise UserError("compare always trains both runs from the start; resume=true is not supported")
    return replace(config, output_dir=config.output_dir or DEFAULT_OUTPUT)


# ---------------------------------------------------------------------------------------------------
# Instruction tokens

def shared_prefix_length(rows: list[EncodedRow]) -> int:
    """How many leading tokens every row has in common (0 for fewer than two rows)."""
    if len(rows) < 2:
        return 0
    first, n = rows[0].input_ids, min(len(r) for r in rows)
    for i in range(n):
        if any(r.input_ids[i] != first[i] for r in rows):
            return i
    return n


def instruction_rows(rows: list[EncodedRow], skip: int) -> list[EncodedRow]:
    """The rows labelled on their instruction tokens instead of their responses.

    Instruction tokens: every token whose role is system, user or tool (roles come from the message a
    token was rendered from, so that message's role header and end marker count too), except the first
    `skip` tokens, which every row shares (`shared_prefix_length`: a default system prompt the template
    inserts, the first role header). Those are the same in every row, so scoring them would measure
    how fast one constant is memorised rather than anything about the instructions. Position 0 is never
    a target. Template text outside any message (`other`) is left out.
    """
    labelled = []
    for row in rows:
        labels = [token if i >= max(skip, 1) and role in INSTRUCTION_ROLES else IGNORE_INDEX
                  for i, (token, role) in enumerate(zip(row.input_ids, row.roles, strict=True))]
        labelled.append(replace(row, labels=labels))
    return labelled


def evenly_spaced(rows: list, count: int) -> list:
    """Up to `count` items spread over the whole list (first one included)."""
    if len(rows) <= count:
        return list(rows)
    return [rows[i * len(rows) // count] for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# Held-out questions

@dataclass
class HeldOut:
    """The questions answered before and after training, with what a right answer looks like."""

    source: str
    conversations: list
    questions: list[str]
    references: list[str]
    answers: list[str | None]
    """The short `answer` key of each row, when the data has one (contains-the-answer looks for it)."""


def load_heldout(config: TrainConfig, options: CompareOptions, eval_rows: list[EncodedRow]) -> HeldOut:
    """The `heldout` file, else `eval_data`, else the rows of `data` in the eval split."""
    from instructune.data.readers import read_conversations
    from instructune.use.evaluate import answer_keys

    source = options.heldout or config.eval_data or config.data
    encoding = config.encoding
    data_format = None if options.heldout else encoding.data_format  # a `heldout` file's format is detected
    read = read_conversations(source, data_format=data_format, on_bad_row=encoding.on_bad_row)
    in_split = {row.row for row in eval_rows} if not (options.heldout or config.eval_data) else None
    keys = answer_keys(source)
    held = HeldOut(source, [], [], [], [])
    for index, conv in read.conversations:
        if conv.is_text or not conv.messages or conv.messages[-1].role != "assistant":
            continue
        if in_split is not None and index not in in_split:
            continue
        users = [m.content for m in conv.messages if m.role == "user"]
        held.conversations.append(conv)
        held.questions.append(users[-1] if users else "")
        held.references.append(conv.messages[-1].content)
        held.answers.append(keys.get(index))
    if not held.conversations:
        raise UserError(f"{source}: no row ends with an assistant turn to answer")
    return held


def score_answers(held: HeldOut, predictions: list[str]) -> dict[str, Any]:
    """Exact match, contains-the-answer and ROUGE-L (None without `rapidfuzz`) over the questions."""
    from instructune.use.text_metrics import contains_answer, exact_match, rouge_available, rouge_l

    n = len(predictions)
    rows = zip(predictions, held.references, held.answers, strict=True)
    scored = [(exact_match(p, r), contains_answer(p, r, a), rouge_l(p, r) if rouge_available() else None)
              for p, r, a in rows]
    return {"questions": n,
            "exact_match": sum(s[0] for s in scored) / n,
            "contains": sum(s[1] for s in scored) / n,
            "rouge_l": math.fsum(s[2] for s in scored) / n if rouge_available() else None}


def answer_all(run, held: HeldOut, options: CompareOptions) -> list[str]:
    """Greedy answers of the run's model to every held-out question."""
    from instructune.use.generation import answer_conversations
    from instructune.use.loading import LoadedModel

    return answer_conversations(LoadedModel.wrap(run.model, run.tokenizer, run.template), held.conversations,
                                max_new_tokens=options.max_new_tokens, batch_size=options.generation_batch_size)


# ---------------------------------------------------------------------------------------------------
# Checks that the two runs differ only in their labels

def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state dict, in order (equal hashes: equal weights)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _data_signature(run) -> dict[str, str]:
    """SHA-256 of what must be equal between the runs: the rows' tokens, the batches of each step, the eval rows."""
    parts = {"train": [r.input_ids for r in run.train_rows], "eval": [r.input_ids for r in run.eval_rows],
             "steps": [run.plan.step(s) for s in range(run.plan.total_steps())]}
    return {key: hashlib.sha256(json.dumps(value).encode()).hexdigest() for key, value in parts.items()}


def _check_same_data(reference: dict[str, str], signature: dict[str, str]) -> None:
    what = {"train": "training rows", "eval": "evaluation rows", "steps": "batches of each step"}
    for key, name in what.items():
        if reference[key] != signature[key]:
            raise UserError(
                f"the masked and unmasked runs would not see the same {name} (e.g. a row kept under one "
                "policy was dropped or truncated differently under the other); the study needs identical "
                "inputs, so check max_length, truncation and rows without a response")


# ---------------------------------------------------------------------------------------------------
# Numbers out of metrics.jsonl

def eval_curve(records: list[dict]) -> dict[str, list]:
    """The eval records as columns: step, response loss and accuracy, instruction losses."""
    evals = [r for r in records if r.get("split") == "eval"]
    return {"step": [r["step"] for r in evals], "response_loss": [r["loss"] for r in evals],
            "response_accuracy": [r["accuracy"] for r in evals],
            "instruction_loss": [r["instruction_loss"] for r in evals],
            "train_instruction_loss": [r["train_instruction_loss"] for r in evals]}


def compute_stats(records: list[dict]) -> dict[str, Any]:
    """Seconds, tokens and trained tokens per optimizer step, from the train records.

    A step's time is its token count over its `tokens_per_s` (which is timed around the step alone),
    not the difference of `elapsed_s`, which also holds the evaluations that ran between steps.
    """
    train = [r for r in records if r.get("split") == "train"]
    step_s, tokens, trained = [], [], []
    last_tokens = last_trained = 0
    for r in train:
        tokens.append(r["tokens"] - last_tokens)
        trained.append(r["trained_tokens"] - last_trained)
        step_s.append(tokens[-1] / r["tokens_per_s"])
        last_tokens, last_trained = r["tokens"], r["trained_tokens"]
    return {"steps": len(train), "median_step_s": statistics.median(step_s), "mean_step_s": statistics.fmean(step_s),
            "train_s": math.fsum(step_s), "elapsed_s": train[-1]["elapsed_s"],
            "tokens_per_step": statistics.fmean(tokens), "trained_tokens_per_step": statistics.fmean(trained),
            "trained_fraction": train[-1]["trained_tokens"] / train[-1]["tokens"],
            "step_s": step_s, "trained_tokens": trained}


def _before_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {"response_loss": metrics["loss"], "response_accuracy": metrics["accuracy"],
            "instruction_loss": metrics["instruction_loss"], "train_instruction_loss": metrics["train_instruction_loss"]}


# ---------------------------------------------------------------------------------------------------
# The study

def run_study(config: TrainConfig, options: CompareOptions | None = None, console=None) -> dict[str, Any]:
    """Train both runs, answer the held-out questions, and return every number of the study."""
    from rich.console import Console

    from instructune.study.timing import paired_step_times
    from instructune.train.checkpoint import OPTIMIZER_FILE
    from instructune.train.loop import evaluate_all, fit, setup_run

    options = options or CompareOptions()
    console = console or Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    output = Path(config.output_dir or DEFAULT_OUTPUT)
    runs: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}  # what the first (masked) run sets up for both
    for number, (name, policy) in enumerate(RUNS, 1):
        console.print(f"compare: run {number} of 2, {name} (train_on: {policy})", markup=False)
        run = setup_run(replace(config, train_on=policy, output_dir=str(output / name)), name=name, console=console)
        signature, fingerprint = _data_signature(run), weights_fingerprint(run.model)
        if not shared:
            if not run.eval_rows:
                raise UserError("compare needs evaluation rows: set eval_data, or eval_fraction above 0")
            sample = evenly_spaced(run.train_rows, TRAIN_PROMPT_ROWS)
            skip = shared_prefix_length(run.eval_rows + sample)
            sets = {"instruction": instruction_rows(run.eval_rows, skip),
                    "train_instruction": instruction_rows(sample, skip)}
            if not sum(r.num_trained for r in sets["instruction"]):
                raise UserError("the evaluation rows have no instruction tokens (plain-text data?): masking "
                                "changes nothing there")
            shared.update(config=run.config, signature=signature, fingerprint=fingerprint, eval_rows=run.eval_rows,
                          masked_rows=run.train_rows,
                          sets=sets, skip=skip, held=load_heldout(run.config, options, run.eval_rows),
                          skipped_text=run.tokenizer.decode(run.eval_rows[0].input_ids[:skip]))
            run.eval_sets = sets
            console.print("compare: scoring and answering with the base model", markup=False)
            shared["before"] = _before_metrics(evaluate_all(run))
            shared["before_answers"] = answer_all(run, shared["held"], options)
        else:
            _check_same_data(shared["signature"], signature)
            if fingerprint != shared["fingerprint"]:
                raise UserError("the unmasked run did not start from the masked run's initial weights "
                                "(a randomly initialised adapter or model?); the study needs the same start")
            run.eval_rows, run.eval_sets = shared["eval_rows"], shared["sets"]  # score both on the same rows
            if options.timing_pairs:
                console.print(f"compare: timing {options.timing_pairs} steps with both label sets, alternately",
                              markup=False)
                shared["paired"] = paired_step_times(run, shared.pop("masked_rows"), pairs=options.timing_pairs)
        result = fit(run, console=console)
        console.print(f"compare: answering {len(shared['held'].questions)} held-out questions", markup=False)
        answers = answer_all(run, shared["held"], options)
        # The checkpoint is the run's final model; its optimizer state (twice the weights) only serves resuming.
        (result.checkpoint / OPTIMIZER_FILE).unlink(missing_ok=True)
        runs[name] = {"train_on": policy, "output_dir": str(run.output_dir), "checkpoint": str(result.checkpoint),
                      "initial_weights_sha256": fingerprint, "data_sha256": signature, "answers": answers}
        del run, result
        gc.collect()
    return _summary(config, options, shared, runs, time.perf_counter() - started)


def _summary(config: TrainConfig, options: CompareOptions, shared: dict, runs: dict,
             elapsed: float) -> dict[str, Any]:
    """Every number of the study, as plain JSON-ready data; the runs' numbers are read from metrics.jsonl."""
    from instructune.train.metrics import read_metrics

    held, sets, resolved = shared["held"], shared["sets"], shared["config"]
    summary: dict[str, Any] = {
        "settings": {**{k: v for k, v in resolved.to_dict().items() if k not in ("train_on", "output_dir")},
                     "output_dir": config.output_dir, "heldout": held.source,
                     "max_new_tokens": options.max_new_tokens, "examples": options.examples},
        "eval": {"rows": len(shared["eval_rows"]),
                 "response_tokens": sum(r.num_trained for r in shared["eval_rows"]),
                 "instruction_tokens": sum(r.num_trained for r in sets["instruction"]),
                 "train_prompt_rows": len(sets["train_instruction"]),
                 "train_prompt_tokens": sum(r.num_trained for r in sets["train_instruction"]),
                 "shared_prefix_tokens": shared["skip"], "shared_prefix_text": shared["skipped_text"]},
        "before": {**shared["before"], "generation": score_answers(held, shared["before_answers"])},
        "runs": {},
    }
    for name, info in runs.items():
        records = read_metrics(info["output_dir"])
        curve = eval_curve(records)
        summary["runs"][name] = {
            **{k: v for k, v in info.items() if k != "answers"},
            "final": {key: values[-1] for key, values in curve.items()},
            "curve": curve,
            "compute": compute_stats(records),
            "generation": score_answers(held, info["answers"]),
        }
    masked, unmasked = summary["runs"]["masked"], summary["runs"]["unmasked"]
    summary["paired_timing"] = shared.get("paired")
    summary["ratios"] = {
        "median_step_s": masked["compute"]["median_step_s"] / unmasked["compute"]["median_step_s"],
        "trained_tokens_per_step": (masked["compute"]["trained_tokens_per_step"]
                                    / unmasked["compute"]["trained_tokens_per_step"]),
        "paired_forward_backward_s": shared["paired"]["median_ratio"] if "paired" in shared else None}
    # run_study stops before training the second run when any of these does not hold
    summary["checks"] = {
        "same_initial_weights": masked["initial_weights_sha256"] == unmasked["initial_weights_sha256"],
        "same_rows_and_order": all(masked["data_sha256"][k] == unmasked["data_sha256"][k] for k in ("train", "steps")),
        "same_eval_rows": masked["data_sha256"]["eval"] == unmasked["data_sha256"]["eval"]}
    summary["answers"] = [
        {"question": q, "reference": r, "answer": a, "before": b, "masked": m, "unmasked": u}
        for q, r, a, b, m, u in zip(held.questions, held.references, held.answers, shared["before_answers"],
                                    runs["masked"]["answers"], runs["unmasked"]["answers"], strict=True)]
    summary["elapsed_s"] = elapsed
    return summary

