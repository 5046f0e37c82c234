"""instructune's Python API: what the commands do, as functions that return objects.

Every name here is re-exported from the package (`from instructune import encode, train`), and the
commands are built on these functions (`instructune prepare`, `inspect`, `explain`, `eval` and
`export` call them). A mistake in the input raises `instructune.UserError` with the message the
command line would print (naming the file, the row and the field); nothing here exits the process.

    import instructune

    data = instructune.encode("data.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct", max_length=512)
    print(data.report.rows_kept, data.report.trained_fraction)
    dataset = data.to_hf()                     # input_ids, labels (-100 = not trained), attention_mask, row
    result = instructune.train(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="data.jsonl", epochs=1)
    model = instructune.load(result.checkpoint)
    print(instructune.generate(model, "Which is the largest ocean?"))

The encoding options (`encode`'s keywords, also taken by `evaluate`) are those of `EncodingOptions`:
`template`, `data_format`, `train_on`, `max_length`, `truncation`, `on_bad_row`, `history`,
`reasoning`, `train_on_eos`, `system_role` and `template_vars`; docs/masking.md explains each.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from instructune.errors import UserError

if TYPE_CHECKING:  # the heavy modules load when a function runs, so `import instructune` stays cheap
    import torch

    from instructune.data.conversation import Conversation
    from instructune.data.options import EncodingOptions
    from instructune.data.prepare import PreparedDataset
    from instructune.train.config import TrainConfig
    from instructune.train.loop import TrainResult
    from instructune.use.evaluate import EvalTotals, RowResult
    from instructune.use.explain import Explanation
    from instructune.use.loading import LoadedModel

__all__ = ["EvalResult", "encode", "encoding_options", "evaluate", "explain", "export_gguf", "generate", "load",
           "save_prepared", "train"]

def encoding_options(template: str | None = None, **options: Any) -> EncodingOptions:
    """The checked `EncodingOptions` of keyword settings; an unknown name or a value out of range is a
    `UserError` that names it.

    Examples:
        >>> encoding_options(train_on="last", max_length=512).max_length
        512
    """
    from instructune.data.options import EncodingOptions, OptionError

    names = [f.name for f in dataclasses.fields(EncodingOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UserError(f"unknown encoding option {unknown[0]!r}; the options are {', '.join(names)}")
    try:
        return EncodingOptions(template=template, **options)
    except OptionError as error:
        raise UserError(f"{error.field} {error.problem}") from None


def options_as_keywords(options: EncodingOptions) -> dict[str, Any]:
    """`options` as the keywords `encode` takes (the inverse of `encoding_options`)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from instructune.model.load import load_tokenizer

        return load_tokenizer(str(tokenizer))
    return tokenizer


def _rows_in_memory(data: Any) -> Any:
    """A path as it is; rows in memory as a list (preparation reads them more than once)."""
    if isinstance(data, (str, os.PathLike)):
        return data
    if isinstance(data, Mapping):
        raise UserError("data: give a list of records, not one record (wrap it in a list)")
    try:
        rows = list(data)
    except TypeError:
        raise UserError(f"data: expected a path, a dataset name or a list of rows, got {type(data).__name__}") from None
    if not rows:
        raise UserError("data: the list of rows is empty")
    return rows


def encode(data: str | os.PathLike | Sequence[Any], tokenizer: Any, *, template: str | None = None,
           data_format: str | None = None, train_on: str = "assistant", max_length: int | None = None,
           truncation: str = "keep_response", on_bad_row: str = "error", history: str = "auto",
           reasoning: str = "train", train_on_eos: str = "turn", system_role: str = "keep",
           template_vars: Mapping[str, Any] | str | None = None, num_proc: int | None = None,
           cache: bool | str | os.PathLike = True, limit: int | None = None) -> PreparedDataset:
    """Encode `data` with exact instruction masks, as training does: `input_ids` and `labels` per row, and
    the report of what was kept and dropped (`instructune inspect` shows the same).

    `data` is a .json/.jsonl/.parquet/.csv file, a folder of them, a Hugging Face dataset name, or rows in
    memory: records in any dataset format (Alpaca, messages, ShareGPT, prompt/completion, text), lists
    of messages, or `Conversation`s. `tokenizer` is a tokenizer, or a Hub id, a folder or a .gguf file to
    load one from. The keywords are the encoding options (docs/masking.md). `cache` keeps the encoded rows
    in instructune's cache (or the folder given) for the next call with the same inputs; `limit` reads
    only the first rows.

    The result's `.rows` are `EncodedRow`s, `.report` the `PreparationReport`, `.to_hf()` a
    `datasets.Dataset` with columns `input_ids`, `labels` (-100 where not trained), `attention_mask`, `row`.

    Examples:
        >>> data = encode([{"instruction": "Which is the largest ocean?", "output": "The Pacific."}],
        ...               "HuggingFaceTB/SmolLM2-135M-Instruct")                       # doctest: +SKIP
        >>> data.report.rows_kept, data.to_hf().column_names                          # doctest: +SKIP
        (1, ['input_ids', 'labels', 'attention_mask', 'row'])
    """
    from instructune.data.prepare import prepare_dataset
    from instructune.data.templates import check_template_choice

    options = encoding_options(template, data_format=data_format, train_on=train_on, max_length=max_length,
                               truncation=truncation, on_bad_row=on_bad_row, history=history, reasoning=reasoning,
                               train_on_eos=train_on_eos, system_role=system_role, template_vars=template_vars)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if num_proc is not None and num_proc < 1:
        raise UserError(f"num_proc must be at least 1, got {num_proc}")
    check_template_choice(options.template)  # a broken template file: one line, before anything is loaded
    rows = _rows_in_memory(data)
    cache_dir = None if cache is True else cache
    return prepare_dataset(rows, _tokenizer(tokenizer), options, num_proc=num_proc, cache_dir=cache_dir,
                           limit=limit)


def save_prepared(prepared: PreparedDataset, output: str | os.PathLike, *, fmt: str = "hf",
                  overwrite: bool = False, source: str | None = None, tokenizer: str | None = None) -> Path:
    """Write `prepared` (from `encode`) into the folder `output`, as `instructune prepare` does: a dataset
    that `datasets.load_from_disk(output)` loads (`fmt="hf"`), or `data.parquet` / `data.jsonl`, with
    `preparation.json` beside it (the report, and `source`, `tokenizer` and the template that made the rows).

    The folder is written under a temporary name and renamed into place when complete; a folder that
    exists and is not empty is a `UserError` unless `overwrite`.

    Examples:
        >>> save_prepared(encode("data.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct"), "prepared/")  # doctest: +SKIP
        PosixPath('prepared')
    """
    from instructune.data.prepare import nothing_kept
    from instructune.show.prepared_folder import write_prepared_folder

    if not prepared.report.rows_kept:
        raise UserError(f"{source or 'data'}: {nothing_kept(prepared.report)}; {output} not written")
    encoding = options_as_keywords(prepared.options)
    encoding["template_vars"] = prepared.options.template_variables()
    settings = {"source": None if source is None else str(source), "tokenizer": tokenizer,
                "encoding": encoding, "template_text": prepared.template}
    return write_prepared_folder(output, prepared.rows, prepared.report, fmt=fmt, settings=settings,
                                 overwrite=overwrite)


def train(config: str | os.PathLike | Mapping[str, Any] | TrainConfig | None = None, *, name: str | None = None,
          quiet: bool = False, **overrides: Any) -> TrainResult:
    """Fine-tune with instruction masking: the run `instructune train CONFIG key=value ...` makes.

    `config` is a YAML file, a mapping of configuration keys, a `TrainConfig`, or None: the default job's
    settings (SmolLM2-135M-Instruct on the packaged question-answer set; `instructune train` without a
    config also compares answers before and after, which this function leaves out). `overrides` are
    configuration keys (`instructune train --help` lists them) and win over `config`. The run writes to
    `output_dir` (default `runs/<name>`: the config file's name, else `default`) and returns a
    `TrainResult`: `.checkpoint` (the final checkpoint folder), `.metrics` (every record of
    `metrics.jsonl`), `.last_loss`, `.eval_metrics`, `.output_dir`. `quiet` prints nothing.

    Examples:
        >>> result = train(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="data.jsonl",
        ...                output_dir="runs/mine", epochs=1, lr=1e-4)                      # doctest: +SKIP
        >>> result.checkpoint                                                              # doctest: +SKIP
        PosixPath('runs/mine/checkpoint-57')
    """
    from rich.console import Console

    from instructune.train.config import TrainConfig, config_from_dict, load_config
    from instructune.train.distributed import is_main_process
    from instructune.train.loop import train as run_training

    if config is None:
        from instructune.study.default_job import default_job_config

        base, name = default_job_config(), name or "default"
    elif isinstance(config, TrainConfig):
        base, name = config, name or "default"
    elif isinstance(config, Mapping):
        base, name = config_from_dict(dict(config), origin="train(config=...)"), name or "default"
    elif isinstance(config, (str, os.PathLike)):
        base, name = load_config(config), name or Path(config).stem
    else:
        raise UserError(f"train: config must be a YAML path, a mapping or a TrainConfig, got {type(config).__name__}")
    resolved = config_from_dict({**base.to_dict(), **overrides}, origin="train() keyword") if overrides else base
    console = Console(highlight=False, soft_wrap=True, quiet=quiet or not is_main_process())
    return run_training(resolved, name=name, console=console)


def load(model: str | os.PathLike, *, template: str | None = None, device: str | None = "auto",
         dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """A model ready to answer: a Hub id, a folder, a training checkpoint, a LoRA adapter folder, a .gguf
    file or `smollm2-135m-instruct`, with its tokenizer, chat template (the model's own, or `template`)
    and stop tokens, in eval mode on `device` (`auto`: CUDA when there is a GPU).

    `.model` and `.tokenizer` are the transformers objects; `generate`, `explain` and `evaluate` take the
    result (or a spec, which they load).

    Examples:
        >>> model = load("runs/default/checkpoint-57")                                     # doctest: +SKIP
        >>> generate(model, "Which is the largest ocean?")                                 # doctest: +SKIP
        'The Pacific Ocean.'
    """
    from instructune.use.loading import load_for_inference

    return load_for_inference(str(model), template=template, device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)


@contextmanager
def _progress(given: Any = None) -> Iterator[Any]:
    """`given`, else a progress bar where a notebook runs the code (rich draws it there), else None."""
    if given is not None:
        yield given
        return
    from rich.console import Console

    console = Console()
    if not console.is_jupyter:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bars:
        yield bars


def _loaded(model: Any, template: str | None, device: str | None, dtype: torch.dtype | None = None) -> LoadedModel:
    from instructune.use.loading import LoadedModel

    if isinstance(model, LoadedModel):
        return model
    return load(model, template=template, device=device, dtype=dtype)


def _one_conversation(example: Any, source: str = "example") -> Conversation:
    """A `Conversation` from a record in any dataset format or a list of messages, checked as a file's row is."""
    from instructune.data.conversation import Conversation
    from instructune.data.stream import record_rows, stream_conversations

    if isinstance(example, Conversation):
        return example
    if not isinstance(example, (Mapping, list)):
        raise UserError(f"{source}: expected a record (a dict), a list of messages or a Conversation, "
                        f"got {type(example).__name__}")
    return next(stream_conversations(source, rows=record_rows([dict(example) if isinstance(example, Mapping)
                                                                 else example], source)))[1]


def explain(model: Any, example: Any = None, *, instruction: str | None = None, response: str | None = None,
            input_text: str | None = None, system: str | None = None, data: str | os.PathLike | None = None,
            row: int | None = None, data_format: str | None = None, template: str | None = None,
            top_k: int = 3, instruction_weight: float | None = None, device: str | None = "auto") -> Explanation:
    """Per-token probabilities and losses of one example under `model`, the instruction's and the
    response's apart: what the masked loss scores and what an unmasked one would add.

    The example is `example` (a record in any dataset format, a list of messages or a `Conversation`), or
    `instruction` and `response` (with optional `input_text`, an Alpaca input, and `system`), or row `row` of the dataset `data`.
    `model` is a `load` result or a spec to load (in fp32). The `Explanation` has `.tokens` (each with its
    probability, loss and top alternatives), `.masked_loss_mean`, `.unmasked_loss_mean` and `.to_json()`.

    Examples:
        >>> e = explain(model, instruction="Which is the largest ocean?", response="The Pacific.")  # doctest: +SKIP
        >>> round(e.masked_loss_mean, 3)                                                           # doctest: +SKIP
        0.412
    """
    import torch

    from instructune.use.explain import conversation_at, example_conversation, explain_conversation

    given = [example is not None, instruction is not None or response is not None, data is not None or row is not None]
    if sum(given) != 1:
        raise UserError("explain: give one example: `example`, or `instruction` and `response`, or `data` and `row`")
    if given[1] and (instruction is None or response is None):
        raise UserError("explain: give both `instruction` and `response`")
    if given[2] and (data is None or row is None):
        raise UserError("explain: give both `data` and `row`")
    if example is not None:
        conv = _one_conversation(example)
    elif instruction is not None:
        conv = example_conversation(instruction, response, input_text=input_text, system=system)
    else:
        encoding_options(data_format=data_format)  # checks the format before the data is read
        conv = conversation_at(str(data), row, data_format)
    # fp32 on every device: the lesson is in the probabilities, which bf16 would blur.
    loaded = _loaded(model, template, device, torch.float32)
    return explain_conversation(loaded.model, loaded.tokenizer, loaded.template, conv, top_k=top_k,
                                instruction_weight=instruction_weight)


@dataclass
class EvalResult:
    """What `evaluate` measured: one `RowResult` per row read, and the totals."""

    rows: list[RowResult]
    totals: EvalTotals

    def to_json(self) -> dict[str, Any]:
        """The totals as JSON values (what `instructune eval --output` writes to totals.json)."""
        return self.totals.to_json()


def evaluate(model: Any, data: str | os.PathLike | None = None, *, limit: int | None = None,
             max_new_tokens: int = 64, batch_size: int = 8, generate: bool = True, progress: Any = None,
             device: str | None = "auto", **options: Any) -> EvalResult:
    """Response loss, perplexity and next-token accuracy of `model` on `data` (default: the held-out set
    that ships with instructune), and unless `generate=False` its greedy answers with exact match,
    contains-the-answer and ROUGE-L: what `instructune eval` prints.

    `options` are `encode`'s encoding options (the rows are encoded as training encodes them, with the
    model's template unless `template` names one). `progress` takes a `rich.progress.Progress`; in a
    notebook, a bar is shown without it.

    Examples:
        >>> result = evaluate("runs/default/checkpoint-57", generate=False)                 # doctest: +SKIP
        >>> round(result.totals.loss, 3)                                                    # doctest: +SKIP
        0.275
    """
    from instructune.use.evaluate import default_eval_data, evaluate_dataset

    encoding = encoding_options(**options)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    loaded = _loaded(model, encoding.template, device)
    with _progress(progress) as bars:
        rows, totals = evaluate_dataset(loaded, str(data) if data is not None else default_eval_data(), encoding,
                                        limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        generate=generate, progress=bars)
    return EvalResult(rows, totals)


@overload
def generate(model: Any, prompts: str | Mapping | Conversation, **kwargs: Any) -> str: ...
@overload
def generate(model: Any, prompts: Sequence[str | Mapping | Conversation], **kwargs: Any) -> list[str]: ...


def generate(model: Any, prompts: Any, *, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, batch_size: int = 8,
             template: str | None = None, device: str | None = "auto", progress: Any = None) -> str | list[str]:
    """Answer prompts with `model` (a `load` result or a spec to load): greedy by default, stopping at the
    template's end-of-turn token, as `instructune generate` does.

    A prompt is a string (one user turn), a record in any dataset format (`prompt`, `instruction`,
    `messages`, ...; a trailing assistant turn is left out) or a `Conversation`. One prompt gives one
    answer; a list gives a list, in order. `system` is the system prompt of prompts that have none.
    `progress` takes a `rich.progress.Progress` to advance (the command line's); by default a bar is shown
    where a notebook runs the code.

    Examples:
        >>> generate(model, ["Which is the largest ocean?", {"instruction": "Name a primary colour."}])  # doctest: +SKIP
        ['The Pacific Ocean.', 'Red.']
    """
    from instructune.data.conversation import Conversation, ConversationError
    from instructune.use.generation import answer_conversations, check_sampling, prompt_conversation
    from instructune.use.prompts import record_conversation

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    single = isinstance(prompts, (str, Mapping, Conversation))
    items = [prompts] if single else list(prompts)
    conversations = []
    for number, item in enumerate(items, start=1):
        try:
            if isinstance(item, Conversation):
                conversations.append(prompt_conversation(item))
            elif isinstance(item, str):
                conversations.append(record_conversation({"prompt": item}, system))
            elif isinstance(item, Mapping):
                conversations.append(record_conversation(dict(item), system))
            else:
                raise UserError(f"expected a string, a record or a Conversation, got {type(item).__name__}")
        except (UserError, ConversationError) as error:
            raise UserError(f"prompt {number}: {error}") from None
    if not conversations:
        return []
    loaded = _loaded(model, template, device)
    with _progress(progress) as bars:
        task = bars.add_task("generating", total=len(conversations)) if bars is not None else None
        answers = answer_conversations(loaded, conversations, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                       on_batch=(lambda n: bars.advance(task, n)) if bars is not None else None)
    return answers[0] if single else answers


def export_gguf(checkpoint: str | os.PathLike, output: str | os.PathLike, *, kind: str = "f16",
                overwrite: bool = False) -> Path:
    """Write a checkpoint (full fine-tuning, or a LoRA adapter merged into its base), a model folder, a
    .gguf file or `smollm2-135m-instruct` as one GGUF file that llama.cpp runs, with the chat template and
    end-of-turn token in its metadata; `kind` is f32, f16 or q8_0. Returns the file's path.

    Examples:
        >>> export_gguf("runs/default/checkpoint-57", "model.gguf", kind="q8_0")           # doctest: +SKIP
        PosixPath('model.gguf')
    """
    from instructune.model.export import GGUF_TYPES, check_output
    from instructune.model.export import export_gguf as write_gguf
    from instructune.model.load import DEFAULT_MODEL

    if kind not in GGUF_TYPES:
        raise UserError(f"kind must be one of {', '.join(GGUF_TYPES)}, got {kind!r}")
    check_output(str(output), overwrite=overwrite)  # before minutes of loading
    checkpoint = str(checkpoint)
    if checkpoint.strip().lower() != DEFAULT_MODEL and not Path(checkpoint).expanduser().exists():
        raise UserError(f"checkpoint not found: {checkpoint} (give a checkpoint folder such as "
                        "runs/default/checkpoint-57, a model folder or a .gguf file)")
    return write_gguf(checkpoint, str(output), kind=kind, overwrite=overwrite)
