"""The rows a training config trains and evaluates on when its `data` is a mixture of sources.

`train`, `inspect CONFIG` and `prepare CONFIG` all come through `prepare_config_mixture`, so the rows
inspected are exactly the rows trained on. A config is a mixture when `data` is a list, or when it asks
for `dedupe: exact` (a single path is then a mixture of one source); a plain `data: path` goes the way
it always has (`setup.prepare_splits`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from instructune.data.encoded import EncodedRow, PreparationReport
from instructune.data.mixture import Mixture, SourceResult, prepare_mixture
from instructune.data.mixture_sources import SourceSpec, check_readable, parse_sources
from instructune.data.options import EncodingOptions
from instructune.errors import UserError
from instructune.train.config import TrainConfig


def uses_mixture(config: TrainConfig) -> bool:
    """Whether `config.data` is prepared as a mixture."""
    return isinstance(config.data, list) or config.dedupe != "none"


def config_sources(config: TrainConfig) -> list[SourceSpec]:
    """The sources of `config.data` (one for a plain path), checked."""
    try:
        return parse_sources(config.data if isinstance(config.data, list) else [config.data])
    except ValueError as error:
        raise UserError(f"'data': {error}") from None


def check_data(config: TrainConfig) -> None:
    """Before anything is loaded: every source of a mixture exists and its column mapping fits its first row,
    and held-out settings do not contradict `eval_data`."""
    if not uses_mixture(config):
        return
    sources = config_sources(config)
    if config.eval_data:
        for source in sources:
            if source.eval_split is not None or source.eval_rows is not None:
                key = "eval_split" if source.eval_split is not None else "eval_rows"
                raise UserError(f"{source.where}: '{key}' holds rows out of the source, but 'eval_data' is set too; "
                                "give one of them")
    check_readable(sources)


@dataclass
class MixtureSplits:
    """A mixture's rows for a run: its training rows, and its held-out rows or those of `eval_data`."""

    mixture: Mixture
    eval_rows: list[EncodedRow]
    eval_overlap: int
    """Evaluation rows equal to a training row, token for token."""


def prepare_config_mixture(config: TrainConfig, tokenizer, console=None, *, cache: bool = True) -> MixtureSplits:
    """Encode and mix the sources of `config` as training does; print a line per source on `console`.
    `cache=False` neither reads nor writes the preparation cache."""
    from instructune.data.prepare import prepare_dataset

    check_data(config)
    cache_dir = None if cache else False
    mixture = prepare_mixture(config_sources(config), tokenizer, config.encoding, seed=config.seed,
                              eval_split=0.0 if config.eval_data else config.eval_fraction, dedupe=config.dedupe,
                              mixture_rows=config.mixture_rows, num_proc=config.num_proc, cache_dir=cache_dir)
    eval_rows = mixture.eval_rows
    if config.eval_data:
        evaluation = prepare_dataset(config.eval_data, tokenizer, config.encoding, template_text=mixture.template,
                                     num_proc=config.num_proc, cache_dir=cache_dir)
        eval_rows = evaluation.rows
    splits = MixtureSplits(mixture, eval_rows, mixture.overlap(eval_rows))
    if console is not None:
        for result in mixture.sources:
            console.print(source_line(result), markup=False, highlight=False)
        console.print(mixture_line(splits), markup=False, highlight=False)
        if splits.eval_overlap:
            console.print(f"warning: {splits.eval_overlap:,} evaluation row(s) equal a training row token for token, "
                          "so the evaluation loss flatters the model (dedupe: exact removes repeats within the "
                          "sources)", markup=False, highlight=False)
    return splits


def source_line(result: SourceResult) -> str:
    """`data 0 (a.jsonl): 999 read, 990 kept (9 dropped: 9 too_long), 20 held out, 300 of 970 taken, ...`."""
    encoding, train = result.encoding, result.train
    dropped = sum(encoding.dropped.values()) + result.duplicates
    reasons = dict(encoding.dropped, **({"duplicate": result.duplicates} if result.duplicates else {}))
    detail = ", ".join(f"{n:,} {reason}" for reason, n in sorted(reasons.items()))
    name = result.source.where.removeprefix("data source ")
    return (f"data {name}: {encoding.rows_read:,} read, {result.units - result.duplicates:,} kept"
            + (f" ({dropped:,} dropped: {detail})" if dropped else "")
            + f", {result.held_out:,} held out, {result.taken:,} taken of {result.available:,}"
            + (f" ({result.repeated:,} repeats)" if result.repeated else "")
            + f", {train.tokens_total:,} tokens, {train.trained_fraction:.0%} trained")


def mixture_line(splits: MixtureSplits) -> str:
    """The mixture in one line: training rows, sources, evaluation rows, tokens."""
    report = splits.mixture.report
    return (f"mixture: {len(splits.mixture.train_rows):,} training rows from {len(splits.mixture.sources)} "
            f"source(s), {len(splits.eval_rows):,} evaluation rows, {report.tokens_total:,} tokens, "
            f"{report.trained_fraction:.0%} trained")


@dataclass
class ConfigRows:
    """The rows a training config prepares, for `inspect CONFIG` and `prepare CONFIG`."""

    rows: Sequence[EncodedRow]
    """A mixture's training rows; a single source's rows (before `eval_fraction` is held out)."""
    report: PreparationReport
    tokenizer: object
    tokenizer_name: str
    template: str
    options: EncodingOptions
    mixture: Mixture | None = None
    eval_rows: Sequence[EncodedRow] = ()


def rows_of_config(path: str | os.PathLike, tokenizer: str | None = None, *, cache: bool = True) -> ConfigRows:
    """Load the training config at `path` and prepare its data as `instructune train` does, with its tokenizer
    (or `tokenizer`); the sources are checked before the tokenizer is loaded."""
    from instructune.data.prepare import prepare_dataset
    from instructune.model.load import load_tokenizer
    from instructune.train.config import load_config

    config = load_config(path)
    if not config.data:
        raise UserError(f"{path}: 'data' is not set")
    check_data(config)
    name = tokenizer or config.tokenizer or config.model
    loaded = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    if not uses_mixture(config):
        prepared = prepare_dataset(config.data, loaded, config.encoding, num_proc=config.num_proc,
                                   cache_dir=None if cache else False)
        return ConfigRows(prepared.rows, prepared.report, loaded, name, prepared.template, config.encoding)
    splits = prepare_config_mixture(config, loaded, cache=cache)
    mixture = splits.mixture
    return ConfigRows(mixture.train_rows, mixture.report, loaded, name, mixture.template, config.encoding, mixture,
                      splits.eval_rows)
