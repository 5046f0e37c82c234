"""Streamed, sharded preparation: equal row for row to the in-memory encoding, resumable after an
interruption, and never trusting a damaged shard."""

import json
import shutil

import numpy as np
import pytest

from instructune.data import encoded as encoded_module
from instructune.data import prepare as prepare_module
from instructune.data import stream as stream_module
from instructune.data.encode import ConversationEncoder
from instructune.data.options import EncodingOptions
from instructune.data.prepare import encode_conversations, prepare_dataset
from instructune.data.readers import read_conversations
from instructune.data.shards import RowView, ShardedRows, row_lengths, select_rows
from instructune.data.stream import StreamTally, chunked, stream_conversations
from instructune.errors import UserError
from instructune.testing import CHATML_TEMPLATE, make_tiny_tokenizer
from instructune.train.config import TrainConfig
from instructune.train.setup import _split_rows

# Long enough to truncate (keep_response) or drop (no_trained_tokens) at max_length=60; multi-turn rows
# that `history="expand"` makes into one row per trained turn; a bad row every 7th.
OPTIONS = EncodingOptions(max_length=60, on_bad_row="skip", history="expand")
SHARD = 5  # conversations per shard in these tests


def mixed_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 7 == 3:
            rows.append({"messages": [{"role": "user", "content": 5}]})  # content is not text: a bad row
        elif i % 5 == 0:
            rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Hi {i}"},
                                      {"role": "assistant", "content": f"Hello {i}"},
                                      {"role": "user", "content": "And?"},
                                      {"role": "assistant", "content": "Bye" * (i % 3 + 1)}]})
        elif i % 6 == 1:
            rows.append({"messages": [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "a"}]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                      {"role": "assistant", "content": f"Answer {i}. " * (i % 9 + 1)}]})
    return rows


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in mixed_rows()))
    return str(path)


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(prepare_module, "SHARD_ROWS", SHARD)


def in_memory(path: str, tok):
    """Today's result: the whole source read into a list, then encoded in memory."""
    read = read_conversations(path, on_bad_row="skip")
    rows, report = encode_conversations(ConversationEncoder(tok, CHATML_TEMPLATE, OPTIONS), read.conversations, 1)
    report.rows_read = read.rows_read
    for index in read.bad_row_indices:
        report.drop_row(index, "bad_row")
    report.drops.sort()
    report.bad_row_messages = read.bad_row_messages
    return rows, report


def encode_calls(monkeypatch, fail_at_row: int | None = None) -> list[int]:
    """Count the conversations encoded (by row index); raise at `fail_at_row` like a killed run would stop."""
    calls, original = [], ConversationEncoder.encode_all

    def counted(self, conv, row=0):
        if row == fail_at_row:
            raise KeyboardInterrupt
        calls.append(row)
        return original(self, conv, row)

    monkeypatch.setattr(ConversationEncoder, "encode_all", counted)
    return calls


def test_the_mixed_data_has_every_case(data):
    _, report = in_memory(data, make_tiny_tokenizer())
    assert report.dropped == {"bad_row": 6, "no_trained_tokens": 5}
    assert report.expanded == 7 and report.expanded_rows == 14 and report.truncated == 17


@pytest.mark.parametrize("num_proc", [1, 2])
def test_sharded_rows_equal_the_in_memory_rows_row_for_row(data, tmp_path, num_proc):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    prepared = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=num_proc,
                               cache_dir=tmp_path / "cache")
    assert isinstance(prepared.rows, ShardedRows) and not prepared.from_cache
    assert len(prepared.rows) == len(rows) == 36
    for mine, theirs in zip(prepared.rows, rows):
        assert mine == theirs  # row index, ids, labels, roles, truncated and turn
    assert [r.turn for r in prepared.rows if r.turn is not None][:4] == [2, 4, 2, 4]
    assert prepared.report == report
    assert list(prepared.rows.lengths) == list(report.lengths) == [len(r) for r in rows]
    # The same without the cache (a list in memory), and again from the cache.
    assert prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, cache_dir=False).rows == rows
    again = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.rows == rows and again.report == report
    assert again.conversations == read_conversations(data, on_bad_row="skip").conversations


def test_an_interrupted_preparation_resumes_from_the_last_complete_shard(data, tmp_path, monkeypatch):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    cache = tmp_path / "cache"
    conversations = read_conversations(data, on_bad_row="skip").conversations  # 34 good rows, 7 shards
    stop = conversations[3 * SHARD + 2][0]  # in the fourth chunk
    encode_calls(monkeypatch, fail_at_row=stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    (entry,) = (cache / "prepared").iterdir()
    assert sorted(p.name for p in (entry / "shards").iterdir()) == ["00000", "00001", "00002"]
    assert not (entry / "manifest.json").exists()

    monkeypatch.undo()
    monkeypatch.setattr(prepare_module, "SHARD_ROWS", SHARD)
    calls = encode_calls(monkeypatch)
    resumed = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    assert calls == [index for index, _ in conversations[3 * SHARD:]]  # the three finished shards are kept
    assert not resumed.from_cache and resumed.rows == rows and resumed.report == report


@pytest.mark.parametrize("damage", ["flip_a_byte", "cut_short", "drop_meta"])
def test_a_damaged_shard_is_encoded_again_not_trusted(data, tmp_path, monkeypatch, damage):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    cache = tmp_path / "cache"
    prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    (entry,) = (cache / "prepared").iterdir()
    shard = entry / "shards" / "00001"
    target = shard / "input_ids.npy"
    content = bytearray(target.read_bytes())
    if damage == "flip_a_byte":  # the size is right: only the checksum of a resumed run can tell
        content[-1] ^= 0xFF
        target.write_bytes(bytes(content))
        (entry / "manifest.json").unlink()
    elif damage == "cut_short":  # the manifest is there, but the shard's size is wrong
        target.write_bytes(bytes(content[: len(content) // 2]))
    else:
        (shard / "meta.json").unlink()
        (entry / "manifest.json").unlink()
    # A half-written shard from a killed worker: a temporary folder that nothing reads.
    shutil.copytree(shard.parent / "00002", shard.parent / "00003.tmp-x")

    calls = encode_calls(monkeypatch)
    again = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    conversations = read_conversations(data, on_bad_row="skip").conversations
    assert calls == [index for index, _ in conversations[SHARD:2 * SHARD]]  # that shard alone
    assert not again.from_cache and again.rows == rows and again.report == report


def test_the_stream_gives_what_read_conversations_lists(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    rows = mixed_rows(30)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]) + "{not json\n")
    (folder / "b.json").write_text(json.dumps(rows[10:20]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in rows[20:]]),
                   folder / "c.parquet")
    tally = StreamTally()
    streamed = list(stream_conversations(folder, on_bad_row="skip", tally=tally))
    read = read_conversations(folder, on_bad_row="skip")
    assert streamed == read.conversations
    assert (tally.rows_read, tally.bad_rows, tally.bad_row_indices, tally.bad_row_messages, tally.format) == (
        read.rows_read, read.bad_rows, read.bad_row_indices, read.bad_row_messages, read.format)
    assert list(stream_conversations(folder, on_bad_row="skip", limit=7)) == read_conversations(
        folder, on_bad_row="skip", limit=7).conversations
    with pytest.raises(UserError, match=r"a.jsonl, line 4"):
        list(stream_conversations(folder))
    (tmp_path / "bad.jsonl").write_text("[]\n")
    with pytest.raises(UserError, match="all 1 rows are bad"):
        list(stream_conversations(tmp_path / "bad.jsonl", on_bad_row="skip"))


def test_chunked_keeps_every_item_in_order():
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []


def test_a_report_names_only_the_first_dropped_rows_but_counts_them_all(data, tmp_path, monkeypatch):
    tok = make_tiny_tokenizer()
    _, full = in_memory(data, tok)  # names all 11
    monkeypatch.setattr(encoded_module, "MAX_NAMED_DROPS", 4)
    monkeypatch.setattr(stream_module, "MAX_NAMED_DROPS", 4)
    for num_proc in (1, 2):
        report = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=num_proc,
                                 cache_dir=tmp_path / f"cache{num_proc}").report
        assert report.dropped == full.dropped and sum(report.dropped.values()) == len(full.drops) == 11
        assert report.drops == full.drops[:4] == [(1, "no_trained_tokens"), (3, "bad_row"),
                                                  (7, "no_trained_tokens"), (10, "bad_row")]


def test_views_select_rows_and_lengths_like_lists(data, tmp_path):
    tok = make_tiny_tokenizer()
    rows, _ = in_memory(data, tok)
    sharded = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, cache_dir=tmp_path / "c").rows
    positions = [5, 0, 35, 17]
    view = select_rows(sharded, positions)
    assert isinstance(view, RowView) and view == [rows[i] for i in positions] == select_rows(rows, positions)
    assert row_lengths(view) == [len(rows[i]) for i in positions] and row_lengths(rows) == [len(r) for r in rows]
    assert sharded[-1] == rows[-1] and sharded[3:6] == rows[3:6] and view[1:3] == [rows[0], rows[35]]
    assert sharded + [] == rows and [] + view == list(view)
    with pytest.raises(IndexError):
        sharded[len(rows)]
    # Training's split of memory-mapped rows is the split of the same rows as a list.
    config = TrainConfig(eval_fraction=0.25, seed=3)
    train, held = _split_rows(sharded, config)
    assert isinstance(train, RowView) and (list(train), list(held)) == _split_rows(rows, config)
    assert np.array_equal(train.lengths, [len(r) for r in _split_rows(rows, config)[0]])


def test_the_cache_key_of_a_stream_is_the_key_computed_as_before(data):
    """The key of the streamed preparation, against the key as it was computed from a list (written out)."""
    import hashlib

    import instructune
    from instructune.data.prepare import _tokenizer_fingerprint

    tok = make_tiny_tokenizer()
    digest = hashlib.sha256()
    settings = {"version": instructune.__version__, "entry": 3, **OPTIONS.row_settings()}
    for part in (json.dumps(settings, sort_keys=True), CHATML_TEMPLATE, _tokenizer_fingerprint(tok)):
        digest.update(part.encode())
        digest.update(b"\0")
    for index, conv in read_conversations(data, on_bad_row="skip").conversations:
        messages = [[m.role, m.content, m.train, m.extra] for m in conv.messages]
        record = [index, messages, conv.tools, conv.text, conv.variables]
        digest.update(json.dumps(record, ensure_ascii=False, default=str).encode())
    key = prepare_module.CacheKey(tok, CHATML_TEMPLATE, OPTIONS)
    for index, conv in stream_conversations(data, on_bad_row="skip"):
        key.add(index, conv)
    assert key.hexdigest() == digest.hexdigest()[:32]


def test_a_failure_in_a_worker_keeps_the_finished_shards_and_the_rerun_does_the_rest(data, tmp_path, monkeypatch):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    cache = tmp_path / "cache"
    conversations = read_conversations(data, on_bad_row="skip").conversations
    failing = conversations[2 * SHARD][0]  # the first row of the third chunk
    original = ConversationEncoder.encode_all

    def fail(self, conv, row=0):
        if row == failing:
            raise RuntimeError("killed")
        return original(self, conv, row)

    monkeypatch.setattr(ConversationEncoder, "encode_all", fail)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=2, cache_dir=cache)
    (entry,) = (cache / "prepared").iterdir()
    finished = {int(p.name) for p in (entry / "shards").iterdir() if p.name.isdigit()}
    assert {0, 1} <= finished and 2 not in finished and not (entry / "manifest.json").exists()

    monkeypatch.setattr(ConversationEncoder, "encode_all", original)
    calls = encode_calls(monkeypatch)
    again = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    chunks = [conversations[i:i + SHARD] for i in range(0, len(conversations), SHARD)]
    assert calls == [index for number, chunk in enumerate(chunks) if number not in finished for index, _ in chunk]
    assert again.rows == rows and again.report == report


def test_a_cache_that_cannot_be_written_still_prepares_the_rows_in_memory(data, tmp_path):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")  # the cache's folders cannot be made under a file
    prepared = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=blocked)
    assert isinstance(prepared.rows, list) and prepared.rows == rows and prepared.report == report
    assert not prepared.from_cache and blocked.read_text() == "not a folder"


def test_a_shard_damaged_after_its_entry_was_finished_is_found_on_reading_and_encoded_again(data, tmp_path,
                                                                                          monkeypatch):
    tok = make_tiny_tokenizer()
    rows, report = in_memory(data, tok)
    cache = tmp_path / "cache"
    prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    (entry,) = (cache / "prepared").iterdir()
    target = entry / "shards" / "00002" / "marks.npy"
    content = bytearray(target.read_bytes())
    content[-1] ^= 0x80  # one mark flipped: the size is right, the manifest is there
    target.write_bytes(bytes(content))

    calls = encode_calls(monkeypatch)
    again = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    conversations = read_conversations(data, on_bad_row="skip").conversations
    assert calls == [index for index, _ in conversations[2 * SHARD:3 * SHARD]]  # that shard alone, redone
    assert not again.from_cache and again.rows == rows and again.report == report


def test_a_full_disk_while_writing_shards_is_one_clear_error_and_keeps_the_finished_shards(data, tmp_path,
                                                                                          monkeypatch):
    import errno
    import os

    from instructune.data import shards as shards_module

    tok = make_tiny_tokenizer()
    cache = tmp_path / "cache"
    real_save = np.save
    saved = []

    def filling_save(path, values, **kwargs):
        saved.append(path)
        if "00003.tmp-" in str(path) and path.name == "marks.npy":  # the fourth shard, half way
            path.write_bytes(b"\x93NUMPY")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(path, values, **kwargs)

    monkeypatch.setattr(shards_module.np, "save", filling_save)
    with pytest.raises(UserError) as failure:
        prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    (entry,) = (cache / "prepared").iterdir()
    message = str(failure.value)
    assert message.startswith(f"no space left on the device to write {entry}: it needs about ")
    assert "of shards finished so far are kept and reused" in message and "INSTRUCTUNE_CACHE" in message
    assert sorted(p.name for p in (entry / "shards").iterdir()) == ["00000", "00001", "00002"]  # no .tmp- left
    assert not (entry / "manifest.json").exists() and not (entry / "manifest.json.tmp").exists()

    monkeypatch.undo()
    monkeypatch.setattr(prepare_module, "SHARD_ROWS", SHARD)
    calls = encode_calls(monkeypatch)
    again = prepare_dataset(data, tok, OPTIONS, template_text=CHATML_TEMPLATE, num_proc=1, cache_dir=cache)
    conversations = read_conversations(data, on_bad_row="skip").conversations
    assert calls == [index for index, _ in conversations[3 * SHARD:]]  # room again: the rest, and only the rest
    assert again.rows == in_memory(data, tok)[0]
