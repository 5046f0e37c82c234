"""Preparing whole datasets: the report, parallel == serial, the cache, and the real SmolLM2 tokenizer
on all 999 rows of the Alpaca demo data in tests/fixtures/data."""

import json
import re
from pathlib import Path

import pytest

from instructune import IGNORE_INDEX
from instructune.data.options import EncodingOptions
from instructune.data.prepare import prepare_dataset
from instructune.testing import make_tiny_tokenizer

ALPACA_DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "alpaca_en_demo.json"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


ROWS = [
    {"instruction": "Which is the largest ocean?", "output": "The Pacific Ocean."},
    {"instruction": "Capital of France?", "input": "Answer briefly.", "output": "Paris."},
    {"instruction": "Say nothing", "output": "x" * 400},  # too long for max_length=60 with keep_response
    {"instruction": 7, "output": "bad row"},  # not a string
    {"instruction": "Which is the smallest ocean?", "output": "The Arctic Ocean."},
]


def test_report_counts_rows_tokens_and_drop_reasons(tmp_path):
    tok = make_tiny_tokenizer()
    prepared = prepare_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS), tok,
                               EncodingOptions(max_length=60, on_bad_row="skip"), cache_dir=False)
    report = prepared.report
    assert report.rows_read == 5 and report.rows_kept == 4
    assert report.dropped == {"bad_row": 1}
    assert report.truncated == 1  # the long response was cut to 60 tokens
    assert [row.row for row in prepared.rows] == [0, 1, 2, 4]
    assert list(report.lengths) == [len(row.input_ids) for row in prepared.rows] and max(report.lengths) == 60
    assert report.tokens_total == sum(report.lengths)
    assert report.tokens_trained == sum(label != IGNORE_INDEX for row in prepared.rows for label in row.labels)
    assert report.trained_fraction == pytest.approx(report.tokens_trained / report.tokens_total)
    assert sum(report.tokens_per_role.values()) == report.tokens_total
    assert set(report.trained_per_role) == {"assistant"}
    assert "line 4" in report.bad_row_messages[0] and "instruction" in report.bad_row_messages[0]


def test_the_report_names_each_dropped_row_also_from_the_cache(tmp_path):
    tok = make_tiny_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    options = EncodingOptions(max_length=60, truncation="drop", on_bad_row="skip")
    first = prepare_dataset(data, tok, options, cache_dir=tmp_path / "cache")
    assert first.report.drops == [(2, "too_long"), (3, "bad_row")]
    assert len(first.report.drops) == sum(first.report.dropped.values())
    assert [index for index, _ in first.conversations] == [0, 1, 2, 4]  # every row read, kept or not
    second = prepare_dataset(data, tok, options, cache_dir=tmp_path / "cache")
    assert second.from_cache and second.report == first.report and second.conversations == first.conversations


def test_rows_left_without_trained_tokens_are_dropped_and_counted(tmp_path):
    tok = make_tiny_tokenizer()
    rows = [{"instruction": "q" * 200, "output": "a"}, {"instruction": "Hi", "output": "Hello"}]
    prepared = prepare_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, EncodingOptions(max_length=40),
                               cache_dir=False)
    assert prepared.report.dropped == {"no_trained_tokens": 1} and [r.row for r in prepared.rows] == [1]


def test_parallel_equals_serial_and_the_cache_returns_the_same_rows(tmp_path):
    tok = make_tiny_tokenizer()
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}." * (i % 5 + 1)} for i in range(300)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    serial = prepare_dataset(data, tok, num_proc=1, cache_dir=False)
    parallel = prepare_dataset(data, tok, num_proc=2, cache_dir=False)
    assert parallel.rows == serial.rows and parallel.report == serial.report
    first = prepare_dataset(data, tok, cache_dir=tmp_path / "cache")
    second = prepare_dataset(data, tok, cache_dir=tmp_path / "cache")
    assert not first.from_cache and second.from_cache
    assert second.rows == serial.rows and second.report == serial.report
    # A different policy is a different cache entry.
    last = prepare_dataset(data, tok, EncodingOptions(train_on="all"), cache_dir=tmp_path / "cache")
    assert not last.from_cache and last.rows != serial.rows


@pytest.mark.slow
def test_smollm2_trains_exactly_each_response_and_im_end_on_all_999_rows(smollm2_tokenizer):
    prepared = prepare_dataset(ALPACA_DEMO, smollm2_tokenizer, cache_dir=False)
    source = json.loads(ALPACA_DEMO.read_text())
    assert prepared.report.rows_read == 999 and prepared.report.rows_kept == 999
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in prepared.rows:
        trained = [t for t, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]
        assert trained[-1] == im_end
        assert smollm2_tokenizer.decode(trained) == source[row.row]["output"] + "<|im_end|>"
        # One contiguous run, and the ids are exactly the tokenizer's for the full render.
        positions = [i for i, label in enumerate(row.labels) if label != IGNORE_INDEX]
        assert positions == list(range(positions[0], positions[-1] + 1))
        text = smollm2_tokenizer.decode(row.input_ids)
        assert smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] == row.input_ids
        assert re.search(r"<\|im_start\|>assistant\n$", smollm2_tokenizer.decode(row.input_ids[: positions[0]]))


def shown(tok, row) -> str:
    tokens = tok.convert_ids_to_tokens(row.input_ids)
    return " ".join(f"[{t}]" if label != IGNORE_INDEX else t for t, label in zip(tokens, row.labels))


HEADER = "<|im_start|> as s is tan t Ċ"


def test_sharegpt_rows_encode_with_mapped_roles(tmp_path):
    tok = make_tiny_tokenizer()
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}]}
    prepared = prepare_dataset(write_jsonl(tmp_path / "s.jsonl", [row]), tok, cache_dir=False)
    assert shown(tok, prepared.rows[0]) == (
        "<|im_start|> sy st em Ċ B e Ġ br i e f . <|im_end|> Ċ <|im_start|> user Ċ H i <|im_end|> Ċ "
        f"{HEADER} [H] [el] [lo] [<|im_end|>] Ċ"
    )


def test_prompt_completion_rows_train_the_completion_only(tmp_path):
    tok = make_tiny_tokenizer()
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello"}]},
    ]
    prepared = prepare_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, cache_dir=False)
    user = "<|im_start|> user Ċ H i <|im_end|> Ċ"
    assert shown(tok, prepared.rows[0]) == f"{user} {HEADER} [H] [el] [lo] [<|im_end|>] Ċ"
    assert shown(tok, prepared.rows[1]) == (
        f"{user} {HEADER} H el lo <|im_end|> Ċ {user} {HEADER} [H] [el] [lo] [<|im_end|>] Ċ"
    )


def test_text_rows_are_language_modelling(tmp_path):
    tok = make_tiny_tokenizer()
    prepared = prepare_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello"}]), tok, cache_dir=False)
    assert shown(tok, prepared.rows[0]) == "H [el] [lo] [</s>]"
    assert prepared.report.tokens_per_role == {"text": 4}
