"""`instructune inspect` and the renderers behind it: markers, summary numbers, HTML, JSONL."""

from __future__ import annotations

import io
import json
import os
import re
from html.parser import HTMLParser

import pytest
from rich.console import Console

from instructune.data.encoded import ROLE_CODE, EncodedRow, PreparationReport
from instructune.errors import UserError
from instructune.show.html import render_html, write_html
from instructune.show.jsonl import atomic_writer, write_jsonl
from instructune.show.summary import histogram, length_stats, percentile, render_summary, summary_tables
from instructune.show.terminal import print_rows, render_tokens
from instructune.show.tokens import (
    MARK_CLOSE,
    MARK_OPEN,
    SEPARATOR,
    RowView,
    TokenView,
    decode_pieces,
    row_view,
    visible,
)
from instructune.testing import make_tiny_tokenizer

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def chatml_row(tokenizer, index: int, turns: list[tuple[str, str]], truncated: bool = False) -> EncodedRow:
    """A ChatML row built by hand: assistant content and its `<|im_end|>` trained, the rest masked."""
    ids, labels, roles = [], [], []
    for role, content in turns:
        head = tokenizer.encode(f"<|im_start|>{role}\n")
        body = tokenizer.encode(f"{content}<|im_end|>")
        tail = tokenizer.encode("\n")
        ids += head + body + tail
        roles += [ROLE_CODE[role]] * (len(head) + len(body) + len(tail))
        labels += [-100] * len(head) + (body if role == "assistant" else [-100] * len(body)) + [-100] * len(tail)
    return EncodedRow(row=index, input_ids=ids, labels=labels, roles=roles, truncated=truncated)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return [
        chatml_row(tokenizer, 0, [("system", "Be\thelpful."), ("user", "Which is the largest ocean?"),
                                  ("assistant", "The Pacific Ocean.\nÇa va? 日本")]),
        chatml_row(tokenizer, 4, [("user", "What is the capital of France?"), ("assistant", "Paris."),
                                  ("user", "Sure?"), ("assistant", "Yes")], truncated=True),
    ]


def parse_marked(text: str) -> tuple[list[str], list[bool]]:
    """Read plain terminal output back into (token pieces, trained flags), using only the markers."""
    pieces, trained, current, inside = [], [], "", False

    def flush() -> None:
        nonlocal current
        if current:
            pieces.append(current)
            trained.append(inside)
        current = ""

    for ch in text:
        if ch in (SEPARATOR, MARK_OPEN, MARK_CLOSE):
            flush()
            inside = ch == MARK_OPEN if ch != SEPARATOR else inside
        else:
            current += ch
    flush()
    return pieces, trained


def test_visible_whitespace_and_controls():
    assert visible("a\tb\nc\r\x00") == "a→b↵\nc␍␀"
    assert visible("") == "▯"
    assert visible(" x ") == " x "


def test_decode_pieces_join_to_the_decoded_row(tokenizer, rows):
    for row in rows:
        pieces = decode_pieces(tokenizer, row.input_ids)
        assert len(pieces) == len(row.input_ids)
        assert "".join(pieces) == tokenizer.decode(row.input_ids, skip_special_tokens=False)
        assert "\ufffd" not in "".join(pieces)
    # 日 is three byte tokens: the first two add nothing, the third adds the whole character.
    ids = tokenizer.encode("日")
    assert decode_pieces(tokenizer, ids) == [""] * (len(ids) - 1) + ["日"]


def test_decode_pieces_keeps_sentencepiece_spaces_and_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Llama-style: "▁" marks a space, and a character outside the vocabulary falls back to <0xNN> bytes.
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", *(f"<0x{i:02X}>" for i in range(256))])
    backend.train_from_iterator(["hello world the quick brown fox"] * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = tokenizer.encode("hello world é")
    pieces = decode_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "hello world é"
    assert pieces[-2:] == ["", "é"] and any(piece.startswith(" w") for piece in pieces)


def test_row_view_carries_ids_labels_roles_and_special_tokens(tokenizer, rows):
    view = row_view(rows[0], tokenizer)
    assert [t.token_id for t in view.tokens] == rows[0].input_ids
    assert [t.label for t in view.tokens] == rows[0].labels
    assert view.tokens[0].text == "<|im_start|>" and view.tokens[0].special and view.tokens[0].role == "system"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(t.special == (t.token_id in (im_end, view.tokens[0].token_id)) for t in view.tokens)
    assert view.header() == f"row 0 · {len(rows[0])} tokens · {rows[0].num_trained} trained"
    assert row_view(rows[1], tokenizer).header().endswith(" · truncated")


@pytest.mark.parametrize("mode", ["no_color_terminal", "pipe"])
def test_terminal_markers_wrap_exactly_the_trained_tokens(tokenizer, rows, monkeypatch, mode):
    if mode == "no_color_terminal":
        monkeypatch.setenv("NO_COLOR", "1")
        console = Console(file=io.StringIO(), force_terminal=True, width=100)
        assert console.no_color
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
        console = Console(file=io.StringIO(), width=100)
    views = [row_view(row, tokenizer) for row in rows]
    print_rows(console, views)
    output = ANSI.sub("", console.file.getvalue())
    assert "legend:" in output.splitlines()[0]
    blocks = output.split("\n\n")[1:]
    assert len(blocks) == len(rows)
    for block, row, view in zip(blocks, rows, views, strict=True):
        header, body = block.split("\n", 1)
        assert header == view.header()
        pieces, trained = parse_marked(body.rstrip("\n") + ("\n" if view.tokens[-1].text.endswith("\n") else ""))
        assert pieces == [visible(t.text) for t in view.tokens]
        assert trained == [label != -100 for label in row.labels]
    # Two assistant turns in the second row: two separately marked runs.
    assert blocks[1].count(MARK_OPEN) == 2 and blocks[1].count(MARK_CLOSE) == 2


def test_terminal_colour_uses_shading_instead_of_separators(tokenizer, rows):
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=100)
    print_rows(console, [row_view(rows[0], tokenizer)])
    raw = console.file.getvalue()
    assert "\x1b[" in raw and SEPARATOR not in raw
    assert ANSI.sub("", raw).count(MARK_OPEN) == 2  # the legend and the one trained run


def test_plain_boundaries_are_unambiguous_across_newlines():
    def plain(*pieces: str) -> str:
        return render_tokens([TokenView(p, i, -100) for i, p in enumerate(pieces)], plain=True).plain

    assert plain("a\n", "\n", "b") == "a↵\n¦↵\n¦b"
    assert plain("a\n\n", "b") == "a↵\n↵\n¦b"
    assert plain("a", "\n  ", "b") == "a¦↵\n  ¦b"


def test_render_tokens_takes_per_token_backgrounds():
    tokens = [TokenView("a", 5, -100, background="#ff0000", note="loss 0.10"), TokenView("b", 6, 6, background="#ffffff")]
    text = render_tokens(tokens, plain=False)
    assert text.plain == "a⟦b⟧"
    assert any("on #ff0000" in str(span.style) for span in text.spans)
    assert tokens[0].describe() == "id 5 · label -100 (masked) · other · loss 0.10"
    assert RowView(3, tokens, notes=["mean loss 0.55"]).header() == "row 3 · 2 tokens · 1 trained · mean loss 0.55"
    with pytest.raises(ValueError):
        TokenView("x", 1, 1, background="red;x")


def make_report(rows: list[EncodedRow]) -> PreparationReport:
    report = PreparationReport(rows_read=len(rows) + 4)
    for row in rows:
        report.add_row(row)
    report.count_drop("bad_row", 3)
    report.count_drop("too_long")
    report.warnings["no_closing_token"] = 2
    report.bad_row_messages = ["data.jsonl, line 2: no messages", "data.jsonl, line 5: unknown role 'bot'"]
    return report


def test_length_statistics_are_exact():
    lengths = [10, 3, 7, 100, 1, 5, 5, 8, 9, 2]
    assert percentile(sorted(lengths), 50) == 5 and percentile(sorted(lengths), 90) == 10
    assert length_stats(lengths) == {"min": 1, "p50": 5, "p90": 10, "p99": 100, "max": 100}
    bins = histogram(list(range(1, 17)), bins=8)
    assert bins == [(1 + 2 * i, 2 + 2 * i, 2) for i in range(8)]
    assert histogram([4, 4, 4]) == [(4, 4, 3)]
    assert sum(n for _, _, n in histogram(lengths)) == len(lengths)


def test_summary_numbers_are_exact():
    rows = [
        EncodedRow(0, [1, 2, 3, 4], [-100, -100, 3, 4], [2, 2, 3, 3]),
        EncodedRow(2, [1, 5, 6, 7, 8, 9], [-100, -100, -100, 7, 8, -100], [1, 2, 3, 3, 3, 0], truncated=True),
    ]
    tables = {t.title: t for t in summary_tables(make_report(rows))}
    assert tables["Rows"].rows == [("read", "6"), ("kept", "2"), ("dropped", "4"), ("  bad_row", "3"),
                                   ("  too_long", "1"), ("truncated", "1")]
    assert tables["Tokens"].rows == [("total", "10"), ("trained", "4"), ("trained fraction", "40.0%")]
    assert tables["Tokens per role"].rows == [("other", "1", "0", "0.0%"), ("system", "1", "0", "0.0%"),
                                              ("user", "3", "0", "0.0%"), ("assistant", "5", "4", "80.0%")]
    assert tables["Row length (tokens)"].header == ("min", "p50", "p90", "p99", "max")
    assert tables["Row length (tokens)"].rows == [("4", "4", "6", "6", "6")]
    assert [row[:2] for row in tables["Length histogram"].rows] == [("4", "1"), ("5", "0"), ("6", "1")]
    assert tables["Warnings"].rows == [("no_closing_token", "2")]
    assert tables["Bad rows"].rows == [("data.jsonl, line 2: no messages",),
                                       ("data.jsonl, line 5: unknown role 'bot'",), ("… and 1 more",)]

    console = Console(file=io.StringIO(), width=120)
    console.print(render_summary(make_report(rows)))
    text = console.file.getvalue()
    assert re.search(r"trained fraction\s+40\.0%", text)
    assert re.search(r"assistant\s+5\s+4\s+80\.0%", text)
    assert "unknown role 'bot'" in text


def test_summary_of_an_empty_run():
    console = Console(file=io.StringIO(), width=120)
    console.print(render_summary(PreparationReport(rows_read=2, dropped={"no_trained_tokens": 2})))
    text = console.file.getvalue()
    assert "no rows kept" in text and re.search(r"no_trained_tokens\s+2", text)


class TokenSpans(HTMLParser):
    """Collects (title, text) of every token span and every attribute that could load something."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[tuple[str, str]] = []
        self.links: list[tuple[str, str]] = []
        self._open: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [(k, v) for k, v in attrs.items() if k in ("src", "href", "srcset", "action")]
        if tag in ("script", "link", "iframe", "img", "object", "embed"):
            self.links.append((tag, ""))
        if tag == "span" and "t" in (attrs.get("class") or "").split() and "title" in attrs:
            self._open = [attrs["title"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.tokens.append(tuple(self._open))
            self._open = None


def test_html_has_every_token_with_its_id_and_label_and_is_self_contained(tokenizer, rows):
    hostile = chatml_row(tokenizer, 9, [("user", '<script>alert("x")</script> & <a href="http://x">'),
                                        ("assistant", "ok")])
    views = [row_view(row, tokenizer) for row in [*rows, hostile]]
    page = render_html(views, make_report(rows), subtitle="data.jsonl · tokenizer <tiny>")
    parser = TokenSpans()
    parser.feed(page)
    expected = []
    for row, view in zip([*rows, hostile], views, strict=True):
        for token, token_id, label in zip(view.tokens, row.input_ids, row.labels, strict=True):
            label_text = f"label {label}" if label != -100 else "label -100 (masked)"
            assert token.describe().startswith(f"id {token_id} · {label_text} · ")
            expected.append((token.describe(), visible(token.text)))
    assert parser.tokens == expected
    assert parser.links == []
    head = page.split("<body>")[0]
    assert "<script" not in page and "://" not in head and "url(" not in head and "@import" not in head
    assert "&lt;tiny&gt;" in page and "<style>" in page and "trained fraction" in page


def test_write_html_writes_the_page(tmp_path, tokenizer, rows):
    path = tmp_path / "inspect.html"
    write_html(path, [row_view(rows[0], tokenizer)], make_report(rows))
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_jsonl_round_trips_exactly_the_arrays(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, rows) == 2
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"row": r.row, "input_ids": r.input_ids, "labels": r.labels} for r in rows
    ]
    assert list(json.loads(lines[0])) == ["row", "input_ids", "labels"]


def test_atomic_write_keeps_the_existing_file_when_writing_fails(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("precious\n")

    def failing_rows():
        yield rows[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl(path, failing_rows())
    assert path.read_text() == "precious\n"
    assert os.listdir(tmp_path) == ["rows.jsonl"]  # no temporary file left behind

    with pytest.raises(UserError, match="cannot write"):
        write_jsonl(tmp_path / "missing" / "rows.jsonl", rows)
    with pytest.raises(UserError, match="cannot write"):
        with atomic_writer(tmp_path) as file:  # a folder cannot be replaced by a file
            file.write("x")
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]


def test_inspect_command_end_to_end(tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig

    from instructune.cli import main
    from instructune.data.prepare import prepare_dataset

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    tokenizer_dir = tmp_path / "tokenizer"
    make_tiny_tokenizer().save_pretrained(tokenizer_dir)
    # `load_tokenizer` takes model folders (a config.json beside the tokenizer files), like checkpoints.
    LlamaConfig(vocab_size=len(make_tiny_tokenizer())).save_pretrained(tokenizer_dir)
    data = tmp_path / "data.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "Which is the largest ocean?"},
                      {"role": "assistant", "content": "The Pacific Ocean."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I am fine."}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, page = tmp_path / "rows.jsonl", tmp_path / "rows.html"

    status = main(["inspect", str(data), "--tokenizer", str(tokenizer_dir), "--jsonl", str(out),
                   "--html", str(page), "--limit", "2"])
    assert status == 0
    expected = prepare_dataset(str(data), make_tiny_tokenizer(), cache_dir=False).rows
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"row": r.row, "input_ids": r.input_ids, "labels": r.labels} for r in expected
    ]
    printed = capsys.readouterr().out
    assert printed.count(MARK_OPEN) == 1 + 2  # the legend, then two rows (--limit 2) of one turn each
    assert "Summary" in printed and re.search(r"kept\s+3", printed) and "trained fraction" in printed
    assert "row 2 ·" not in printed and "wrote 3 row(s)" in printed
    assert page.read_text(encoding="utf-8").count('class="row"') == 2


@pytest.mark.parametrize("flags, named", [
    (["--max-length", "0"], "--max-length must be at least 2"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--format", "xml"], "--format must be a known format"),
])
def test_inspect_refuses_encoding_settings_out_of_range_before_loading(tmp_path, capsys, flags, named):
    from instructune.cli import main

    # The tokenizer does not exist: the flags are checked first, so its absence never comes up.
    status = main(["inspect", str(tmp_path / "data.jsonl"), "--tokenizer", str(tmp_path / "missing"), *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"error: {named}") and err.count("\n") == 1


def _tokenizer_folder(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "tokenizer"
    make_tiny_tokenizer().save_pretrained(folder)
    LlamaConfig(vocab_size=len(make_tiny_tokenizer())).save_pretrained(folder)
    return folder


def test_a_broken_template_file_fails_before_anything_is_loaded_or_read(tmp_path, capsys):
    from instructune.cli import main

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    # Neither the data nor the tokenizer exists: the template is checked first.
    status = main(["inspect", str(tmp_path / "data.jsonl"), "--tokenizer", str(tmp_path / "missing"),
                   "--template", str(template)])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: template file {template}, line 2, column 17: Jinja syntax error: unexpected '}}'\n"


@pytest.mark.parametrize("jsonl", [False, True])
def test_every_row_dropped_shows_the_summary_then_fails(tmp_path, capsys, monkeypatch, jsonl):
    from instructune.cli import main

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Which is the largest ocean? {i}",
                                        "output": "The Pacific Ocean."}) + "\n" for i in range(3)))
    out = tmp_path / "rows.jsonl"
    status = main(["inspect", str(data), "--tokenizer", str(_tokenizer_folder(tmp_path)), "--max-length", "4",
                   "--truncation", "drop", *(["--jsonl", str(out)] if jsonl else [])])
    captured = capsys.readouterr()
    assert status == 2
    assert "Summary" in captured.out and "too_long" in captured.out  # how the user finds out why
    assert captured.err == (f"error: {data}: no rows kept: 3 too_long (see the summary above)"
                            + (f"; {out} not written" if jsonl else "") + "\n")
    assert not out.exists()
