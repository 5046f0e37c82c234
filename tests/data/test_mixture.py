"""Mixtures of sources: exact shares, held-out rows by content hash, dedupe, per-source settings and
caching, and the errors of a bad mixture (tests/data/test_shares.py has the share arithmetic alone)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructune.data.encoded import ROLE_CODE
from instructune.data.mixture import prepare_mixture
from instructune.data.mixture_sources import content_hash, parse_sources
from instructune.data.options import EncodingOptions
from instructune.data.prepare import prepare_dataset
from instructune.errors import UserError
from instructune.testing import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def alpaca(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(start, start + n)))
    return path


def chats(path: Path, n: int) -> Path:
    pq.write_table(pa.Table.from_pylist([{"dialog": [{"role": "human", "content": f"Hello {i}"},
                                                     {"role": "gpt", "content": f"Hi {i}"}]} for i in range(n)]), path)
    return path


def prompts(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        for i in range(n):
            writer.writerow([f"Why {i}?", f"Because {i}."])
    return path


def three_sources(folder: Path, extra: dict | None = None) -> list[dict]:
    """The issue's mixture: Alpaca JSONL by `rows`, Parquet messages by `fraction`, CSV prompt/completion
    with renamed columns by `weight`."""
    extra = extra or {}
    return [
        {"path": str(alpaca(folder / "alpaca.jsonl", 40)), "rows": 25, **extra.get(0, {})},
        {"path": str(chats(folder / "chat.parquet", 30)), "label": "chat", "fraction": 0.5,
         "columns": {"messages": "dialog"}, "roles": {"human": "user", "gpt": "assistant"},
         "system": "Be kind.", **extra.get(1, {})},
        {"path": str(prompts(folder / "pc.csv", 10)), "columns": {"prompt": "question", "completion": "answer"},
         "weight": 1, **extra.get(2, {})},
    ]


def mix(tokenizer, sources, tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return prepare_mixture(parse_sources(sources), tokenizer, EncodingOptions(), **kwargs)


def taken(mixture) -> list[tuple[str, int]]:
    return [(row.source, row.row) for row in mixture.train_rows]


def test_three_sources_take_exactly_their_shares(tokenizer, tmp_path):
    mixture = mix(tokenizer, three_sources(tmp_path), tmp_path, eval_split=0.0)
    counts = [(r.source.label, r.encoding.rows_read, r.available, r.wanted, r.taken, r.repeated)
              for r in mixture.sources]
    assert counts == [("0", 40, 40, 25, 25, 0), ("chat", 30, 30, 15, 15, 0), ("2", 10, 10, 10, 10, 0)]
    rows = taken(mixture)
    assert len(rows) == 50 and [s for s, _ in rows] == ["0"] * 25 + ["chat"] * 15 + ["2"] * 10
    assert len(set(rows)) == 50  # no repeats: every share fits its source
    assert mixture.report.rows_read == 80 and mixture.report.rows_kept == 50
    assert mixture.report.tokens_total == sum(mixture.train_rows.lengths)
    # The mapped columns and speakers, and the source's system prompt, are what was encoded.
    text = tokenizer.decode(next(row for row in mixture.train_rows if row.source == "chat").input_ids)
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello ")
    assert "Why " in tokenizer.decode(mixture.train_rows[-1].input_ids)


def test_the_same_seed_takes_the_same_rows_under_any_num_proc_and_another_seed_others(tokenizer, tmp_path):
    sources = three_sources(tmp_path)
    first = taken(mix(tokenizer, sources, tmp_path, seed=3, num_proc=1, cache_dir=False))
    assert taken(mix(tokenizer, sources, tmp_path, seed=3, num_proc=2, cache_dir=False)) == first
    assert taken(mix(tokenizer, sources, tmp_path, seed=3, num_proc=2)) == first  # through the cache
    assert taken(mix(tokenizer, sources, tmp_path, seed=3, num_proc=1)) == first  # from the cache
    assert taken(mix(tokenizer, sources, tmp_path, seed=4)) != first


def test_a_share_larger_than_the_source_repeats_every_row_then_samples(tokenizer, tmp_path):
    sources = [{"path": str(alpaca(tmp_path / "a.jsonl", 4)), "rows": 10}]
    mixture = mix(tokenizer, sources, tmp_path)
    rows = [row for _, row in taken(mixture)]
    assert len(rows) == 10 and sorted(set(rows)) == [0, 1, 2, 3]
    assert sorted(rows.count(r) for r in range(4)) == [2, 2, 3, 3]  # twice each, then 2 more
    assert mixture.sources[0].repeated == 6
    rows = [row for _, row in taken(mix(tokenizer, [{"path": sources[0]["path"], "fraction": 2.5}], tmp_path))]
    assert len(rows) == 10 and sorted(rows.count(r) for r in range(4)) == [2, 2, 3, 3]


def test_weights_share_mixture_rows_exactly(tokenizer, tmp_path):
    sources = [{"path": str(alpaca(tmp_path / "a.jsonl", 50)), "weight": 3},
               {"path": str(prompts(tmp_path / "b.csv", 50)), "weight": 1,
                "columns": {"prompt": "question", "completion": "answer"}},
               {"path": str(alpaca(tmp_path / "c.jsonl", 5, start=100)), "rows": 5}]
    mixture = mix(tokenizer, sources, tmp_path, mixture_rows=25)
    assert [r.taken for r in mixture.sources] == [15, 5, 5] and len(mixture.train_rows) == 25
    # Without mixture_rows: as many as the weighted sources give without repeating a row (a is taken whole).
    assert [r.taken for r in mix(tokenizer, sources, tmp_path).sources] == [50, 16, 5]


def test_held_out_rows_are_chosen_by_content_and_never_train(tokenizer, tmp_path):
    path = alpaca(tmp_path / "a.jsonl", 200)
    mixture = mix(tokenizer, [{"path": str(path), "eval_split": 0.1}], tmp_path)
    held = {row.row for row in mixture.eval_rows}
    trained = {row.row for row in mixture.train_rows}
    assert held and not held & trained and len(held | trained) == 200
    assert mixture.sources[0].held_out == len(held)
    # Exactly the rows whose content hash is in the lowest tenth of the range.
    expected = {i for i in range(200) if content_hash(_conversation(i)) < 0.1 * 2**64}
    assert held == expected
    assert mixture.overlap(mixture.eval_rows) == 0


def _conversation(i: int):
    from instructune.data.formats import alpaca_to_conversation

    return alpaca_to_conversation({"instruction": f"Question {i}?", "output": f"Answer {i}."})


def test_appending_rows_leaves_every_held_out_row_held_out(tokenizer, tmp_path):
    path = alpaca(tmp_path / "a.jsonl", 100)
    before = mix(tokenizer, [{"path": str(path), "eval_split": 0.2}], tmp_path)
    with path.open("a") as f:
        f.write("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                        for i in range(100, 300)))
    after = mix(tokenizer, [{"path": str(path), "eval_split": 0.2}], tmp_path)
    held_before = {row.row for row in before.eval_rows}
    held_after = {row.row for row in after.eval_rows}
    assert held_before and held_before <= held_after
    assert {row.row for row in after.train_rows if row.row < 100} == {row.row for row in before.train_rows}


def test_eval_rows_holds_out_exactly_n_rows(tokenizer, tmp_path):
    mixture = mix(tokenizer, [{"path": str(alpaca(tmp_path / "a.jsonl", 30)), "eval_rows": 4}], tmp_path)
    assert len(mixture.eval_rows) == 4 and len(mixture.train_rows) == 26


def test_dedupe_exact_drops_rows_that_encode_alike_across_sources_and_counts_them(tokenizer, tmp_path):
    a = alpaca(tmp_path / "a.jsonl", 10)
    b = tmp_path / "b.jsonl"
    # The same conversations written as messages: they render alike, so they are duplicates of a's rows.
    b.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                  {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                         for i in [0, 1, 2, 50, 50]))
    mixture = mix(tokenizer, [{"path": str(a)}, {"path": str(b)}], tmp_path, dedupe="exact")
    assert [r.duplicates for r in mixture.sources] == [0, 4]
    assert [row for s, row in taken(mixture) if s == "1"] == [3]
    assert mixture.report.dropped == {"duplicate": 4}
    kept = mix(tokenizer, [{"path": str(a)}, {"path": str(b)}], tmp_path)
    assert [r.duplicates for r in kept.sources] == [0, 0] and len(kept.train_rows) == 15


def test_an_evaluation_row_equal_to_a_training_row_is_counted(tokenizer, tmp_path):
    mixture = mix(tokenizer, [{"path": str(alpaca(tmp_path / "a.jsonl", 10))}], tmp_path)
    evaluation = prepare_dataset(str(alpaca(tmp_path / "e.jsonl", 3, start=8)), tokenizer, EncodingOptions(),
                                 cache_dir=False)
    assert mixture.overlap(evaluation.rows) == 2  # rows 8 and 9 train too


def test_per_source_settings_apply_to_that_source_only(tokenizer, tmp_path):
    sources = [{"path": str(alpaca(tmp_path / "a.jsonl", 3)), "train_on": "all"},
               {"path": str(alpaca(tmp_path / "b.jsonl", 3, start=10))}]
    mixture = mix(tokenizer, sources, tmp_path)
    user = ROLE_CODE["user"]

    def trained_user_tokens(source: str) -> int:
        return sum(label != -100 and role == user for row in mixture.train_rows if row.source == source
                   for label, role in zip(row.labels, row.roles))

    assert trained_user_tokens("0") > 0 and trained_user_tokens("1") == 0


def test_changing_one_source_re_encodes_that_source_only(tokenizer, tmp_path, monkeypatch):
    import instructune.data.prepare as prepare_module

    sources = three_sources(tmp_path)
    mix(tokenizer, sources, tmp_path)
    encoded = []
    real = prepare_module._encode_to_shards
    monkeypatch.setattr(prepare_module, "_encode_to_shards",
                        lambda encoder, conversations, entry, *rest: encoded.append(entry) or real(
                            encoder, conversations, entry, *rest))
    alpaca(tmp_path / "alpaca.jsonl", 41)
    mixture = mix(tokenizer, sources, tmp_path)
    assert len(encoded) == 1 and mixture.sources[0].encoding.rows_read == 41
    sources[1]["system"] = "Be brief."  # a source's own setting is part of its cache key
    mix(tokenizer, sources, tmp_path)
    assert len(encoded) == 2


@pytest.mark.parametrize("change, message", [
    ({0: {"rows": 50, "repeat": False}}, "data source 0 ({a}): 'rows' asks for 50 rows, but the source has 40 "
                                         "training rows"),
    ({1: {"fraction": 1.5, "repeat": False}}, "data source 'chat' ({b}): 'fraction' asks for 45 rows"),
    ({2: {"columns": {"prompt": "query"}}}, "data source 2 ({c}), row 0: 'columns' maps 'prompt' to the column "
                                             "'query', which this row does not have (its columns: 'question', "
                                             "'answer')"),
    ({2: {"weight": 0}}, "every source's 'weight' is 0"),
    ({0: {"path": "missing.jsonl"}}, "data source 0 (missing.jsonl): 'path': no such file or folder"),
])
def test_a_bad_mixture_is_one_error_naming_the_source_and_key(tokenizer, tmp_path, change, message):
    sources = three_sources(tmp_path, change)
    with pytest.raises(UserError) as error:
        mix(tokenizer, sources, tmp_path)
    assert message.format(a=tmp_path / "alpaca.jsonl", b=tmp_path / "chat.parquet", c=tmp_path / "pc.csv") \
        in str(error.value)


def test_a_missing_column_in_a_later_row_is_a_bad_row(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n" + json.dumps({"x": "Why?"}) + "\n")
    sources = [{"path": str(path), "columns": {"prompt": "q", "completion": "a"}}]
    with pytest.raises(UserError, match=r"p.jsonl, line 2: 'columns' maps 'prompt' to the column 'q'"):
        mix(tokenizer, sources, tmp_path)
    mixture = mix(tokenizer, [dict(sources[0], on_bad_row="skip")], tmp_path)
    assert mixture.report.dropped == {"bad_row": 1} and len(mixture.train_rows) == 1


@pytest.mark.parametrize("source, message", [
    ({"path": "a.jsonl", "rows": 3, "weight": 1}, "give one of 'rows', 'fraction' or 'weight', not 'rows' and 'weight'"),
    ({"path": "a.jsonl", "rows": -1}, "'rows' must be a whole number of 0 or more, got -1"),
    ({"path": "a.jsonl", "wieght": 1}, "unknown key 'wieght' (did you mean 'weight'?)"),
    ({"path": "a.jsonl", "train_on": "some"}, "'train_on' must be one of assistant, last, all, got 'some'"),
    ({"path": "a.jsonl", "roles": {"bot": "robot"}}, "'roles' maps 'bot' to 'robot', which is not a role"),
    ({"path": "a.jsonl", "eval_split": 0.1, "eval_rows": 3}, "give 'eval_split' or 'eval_rows', not both"),
    ({"rows": 3}, "data source 0: 'path' must be a file, a folder or a Hub dataset name, got None"),
])
def test_source_settings_are_checked(source, message):
    with pytest.raises(ValueError) as error:
        parse_sources([source])
    assert message in str(error.value)


def test_hub_sources_pass_their_loading_settings(tokenizer, tmp_path, monkeypatch):
    import datasets

    seen = {}

    def load_dataset(path, **kwargs):
        seen.update(dataset=path, **kwargs)
        return [{"instruction": "Hi", "output": "Hello"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    sources = [{"path": "owner/set", "name": "en", "split": "validation", "revision": "v2", "data_files": "x.json"}]
    mixture = mix(tokenizer, sources, tmp_path)
    assert seen == {"dataset": "owner/set", "name": "en", "split": "validation", "revision": "v2",
                    "data_files": "x.json"}
    assert len(mixture.train_rows) == 1
