"""Encoded rows as a Hugging Face `datasets` table: the columns other trainers take as they are.

`input_ids` (int32), `labels` (int64, -100 where a token is not trained, unshifted: docs/masking.md,
rule 1), `attention_mask` (int8, all ones: rows are unpadded) and `row` (the source row), and for a
mixture's rows `source` (the source's label, so that `row` can be found in it). TRL's
`SFTTrainer` keeps a dataset that already has `input_ids` as it is, `labels` included, and
transformers' `Trainer` hands the columns its model takes to the data collator
(`instructune.data.collator.Collator`). The dtypes are those `datasets` itself picks for tokenized
columns, and `labels` stays int64, the type PyTorch's cross-entropy wants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from instructune.data.encoded import EncodedRow

COLUMNS = ("input_ids", "labels", "attention_mask", "row")
"""The columns of a prepared dataset, in order."""
SOURCE_COLUMN = "source"
"""The column a mixture's rows add after `COLUMNS`: the label of the source each row came from."""

BATCH_ROWS = 1024
"""Rows per Arrow record batch: the table is built from batches, so a list of Python ints never holds more."""


def has_sources(rows: Sequence[EncodedRow]) -> bool:
    """Whether the rows come from a mixture (carry their source), and so take the `source` column."""
    return len(rows) > 0 and rows[0].source is not None


def columns(sources: bool = False) -> tuple[str, ...]:
    """The columns of a prepared dataset: `COLUMNS`, and `source` for a mixture's rows."""
    return COLUMNS + ((SOURCE_COLUMN,) if sources else ())


def features(sources: bool = False):
    """The `datasets.Features` of a prepared dataset (with the `source` column for a mixture's rows)."""
    from datasets import Features, Sequence, Value

    found = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int64")),
             "attention_mask": Sequence(Value("int8")), "row": Value("int64")}
    if sources:
        found[SOURCE_COLUMN] = Value("string")
    return Features(found)


def row_dict(row: EncodedRow) -> dict[str, object]:
    """One row as the dataset holds it."""
    values = {"input_ids": list(row.input_ids), "labels": list(row.labels),
              "attention_mask": [1] * len(row.input_ids), "row": int(row.row)}
    if row.source is not None:
        values[SOURCE_COLUMN] = row.source
    return values


def arrow_batches(rows: Iterable[EncodedRow], sources: bool = False) -> Iterator:
    """The rows as `pyarrow.RecordBatch`es of `BATCH_ROWS` rows with the dataset's schema."""
    import pyarrow as pa

    schema = features(sources).arrow_schema
    batch: list[EncodedRow] = []

    def record_batch(part: list[EncodedRow]) -> pa.RecordBatch:
        values = {name: [] for name in columns(sources)}
        for row in part:
            for name, value in row_dict(row).items():
                values[name].append(value)
        return pa.RecordBatch.from_pydict(values, schema=schema)

    for row in rows:
        batch.append(row)
        if len(batch) == BATCH_ROWS:
            yield record_batch(batch)
            batch = []
    if batch:
        yield record_batch(batch)


def arrow_table(rows: Sequence[EncodedRow]):
    """The rows as one `pyarrow.Table` (an empty one with the schema when there are none)."""
    import pyarrow as pa

    sources = has_sources(rows)
    return pa.Table.from_batches(list(arrow_batches(rows, sources)), schema=features(sources).arrow_schema)


def to_hf_dataset(rows: Sequence[EncodedRow]):
    """The rows as an in-memory `datasets.Dataset` (nothing is written to the `datasets` cache)."""
    from datasets import Dataset

    return Dataset(arrow_table(rows))


def to_iterable_hf_dataset(rows: Sequence[EncodedRow]):
    """The rows as a `datasets.IterableDataset`, read from `rows` as it is iterated."""
    from datasets import IterableDataset

    def generate(rows: Sequence[EncodedRow]) -> Iterator[dict[str, object]]:
        for row in rows:
            yield row_dict(row)

    return IterableDataset.from_generator(generate, features=features(has_sources(rows)), gen_kwargs={"rows": rows})
