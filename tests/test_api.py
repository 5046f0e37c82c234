"""The public API (`instructune.api`, re-exported by the package): its names and signatures are pinned
here, so changing one is a deliberate act; it raises `UserError`s, never exits; and a script that uses
only it (examples/quickstart.py) prepares data, trains, explains, generates and evaluates."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import instructune
from instructune import UserError

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = ["IGNORE_INDEX", "__version__", "train", "encode", "save_prepared", "load", "explain", "evaluate",
          "generate", "export_gguf", "EvalResult", "Collator", "Conversation", "Message", "EncodingOptions",
          "EncodedRow", "PreparationReport", "PreparedDataset", "TrainConfig", "TrainResult", "LoadedModel",
          "Explanation", "UserError"]

SIGNATURES = {
    "train": "(config: 'str | os.PathLike | Mapping[str, Any] | TrainConfig | None' = None, *, name: 'str | None' "
             "= None, quiet: 'bool' = False, **overrides: 'Any') -> 'TrainResult'",
    "encode": "(data: 'str | os.PathLike | Sequence[Any]', tokenizer: 'Any', *, template: 'str | None' = None, "
              "data_format: 'str | None' = None, train_on: 'str' = 'assistant', max_length: 'int | None' = None, "
              "truncation: 'str' = 'keep_response', on_bad_row: 'str' = 'error', history: 'str' = 'auto', "
              "reasoning: 'str' = 'train', train_on_eos: 'str' = 'turn', system_role: 'str' = 'keep', "
              "template_vars: 'Mapping[str, Any] | str | None' = None, num_proc: 'int | None' = None, "
              "cache: 'bool | str | os.PathLike' = True, limit: 'int | None' = None) -> 'PreparedDataset'",
    "save_prepared": "(prepared: 'PreparedDataset', output: 'str | os.PathLike', *, fmt: 'str' = 'hf', "
                     "overwrite: 'bool' = False, source: 'str | None' = None, tokenizer: 'str | None' = None) "
                     "-> 'Path'",
    "load": "(model: 'str | os.PathLike', *, template: 'str | None' = None, device: 'str | None' = 'auto', "
            "dtype: 'torch.dtype | None' = None, trust_remote_code: 'bool' = False) -> 'LoadedModel'",
    "explain": "(model: 'Any', example: 'Any' = None, *, instruction: 'str | None' = None, response: 'str | None' "
               "= None, input_text: 'str | None' = None, system: 'str | None' = None, data: 'str | os.PathLike | "
               "None' = None, row: 'int | None' = None, data_format: 'str | None' = None, template: 'str | None' "
               "= None, top_k: 'int' = 3, instruction_weight: 'float | None' = None, device: 'str | None' = "
               "'auto') -> 'Explanation'",
    "evaluate": "(model: 'Any', data: 'str | os.PathLike | None' = None, *, limit: 'int | None' = None, "
                "max_new_tokens: 'int' = 64, batch_size: 'int' = 8, generate: 'bool' = True, progress: 'Any' = "
                "None, device: 'str | None' = 'auto', **options: 'Any') -> 'EvalResult'",
    "generate": "(model: 'Any', prompts: 'Any', *, system: 'str | None' = None, max_new_tokens: 'int' = 256, "
                "temperature: 'float' = 0.0, top_p: 'float' = 1.0, seed: 'int | None' = None, batch_size: 'int' = "
                "8, template: 'str | None' = None, device: 'str | None' = 'auto', progress: 'Any' = None) -> "
                "'str | list[str]'",
    "export_gguf": "(checkpoint: 'str | os.PathLike', output: 'str | os.PathLike', *, kind: 'str' = 'f16', "
                   "overwrite: 'bool' = False) -> 'Path'",
}

FIELDS = {
    "PreparedDataset": ["rows", "report", "template", "from_cache", "read_again", "_conversations", "tokenizer",
                        "options"],
    "TrainResult": ["output_dir", "checkpoint", "steps", "last_loss", "eval_metrics", "merged", "gguf"],
    "EvalResult": ["rows", "totals"],
    "Collator": ["tokenizer", "packing", "pad_to_multiple_of", "pad_token_id"],
}


def test_the_public_names_and_signatures_are_these():
    assert instructune.__all__ == PUBLIC
    assert all(getattr(instructune, name) is not None for name in PUBLIC)
    assert sorted(n for n in dir(instructune) if not n.startswith("_") and n in PUBLIC) == sorted(
        n for n in PUBLIC if not n.startswith("_"))
    for name, signature in SIGNATURES.items():
        assert str(inspect.signature(getattr(instructune, name))) == signature, name
        assert getattr(instructune, name).__doc__, name
    for name, fields in FIELDS.items():
        assert [f.name for f in dataclasses.fields(getattr(instructune, name))] == fields, name
    # encode's keywords are the encoding options, each of them.
    options = [f.name for f in dataclasses.fields(instructune.EncodingOptions)]
    assert [p for p in inspect.signature(instructune.encode).parameters if p in options] == options
    # The API functions' docstrings carry an example.
    for name in SIGNATURES:
        assert ">>> " in (getattr(instructune.api, name).__doc__ or ""), name


def test_train_is_the_function_and_the_sub_package_alike():
    import instructune.train.loop as loop  # the sub-package still imports as one
    from instructune import train

    assert train is sys.modules["instructune.train"] and callable(train) and loop.TrainResult
    assert str(inspect.signature(train)) == SIGNATURES["train"]


def test_importing_instructune_loads_no_heavy_library():
    code = ("import sys, instructune; instructune.encode; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mistakes_raise_user_errors_with_the_commands_messages(tmp_path):
    from instructune.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(UserError, match="^max_length must be at least 2"):
        instructune.encode([{"instruction": "q", "output": "a"}], tokenizer, max_length=1)
    with pytest.raises(UserError, match="^unknown encoding option 'train_in'"):
        instructune.evaluate("unused", train_in="last")
    with pytest.raises(UserError, match=r"^records, row 1, field 'output': missing key 'output'"):
        instructune.encode([{"instruction": "q", "output": "a"}, {"instruction": "q"}], tokenizer, cache=False)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n{broken\n")
    with pytest.raises(UserError, match=f"^{data}, line 2: "):
        instructune.encode(str(data), tokenizer, cache=False)
    with pytest.raises(UserError, match="unknown key 'lrr' \\(did you mean 'lr'\\?\\)"):
        instructune.train(data=str(data), lrr=1)
    with pytest.raises(UserError, match="give one example"):
        instructune.explain("unused")
    with pytest.raises(UserError, match="prompt 2: "):
        instructune.generate("unused", ["fine", {"nothing": 1}])
    with pytest.raises(UserError, match="should end in .gguf"):
        instructune.export_gguf("unused", tmp_path / "model.bin")
    prepared = instructune.encode([{"instruction": "q", "output": "a"}], tokenizer, max_length=2,
                                  truncation="drop", cache=False)
    with pytest.raises(UserError, match="no rows kept: 1 too_long; .* not written"):
        instructune.save_prepared(prepared, tmp_path / "out")


def test_encode_takes_rows_in_memory_as_a_file_of_them(tmp_path):
    from instructune.data.conversation import Conversation, Message
    from instructune.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    messages = [[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I am fine."}]]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": messages[0]}) + "\n")
    from_file = instructune.encode(str(path), tokenizer, cache=False)
    conversation = Conversation([Message("user", "Hello"), Message("assistant", "I am fine.")])
    for data in (messages, [{"messages": messages[0]}], [conversation]):
        prepared = instructune.encode(data, tokenizer, cache=False)
        assert [(r.row, r.input_ids, r.labels) for r in prepared.rows] == \
            [(r.row, r.input_ids, r.labels) for r in from_file.rows]
    table = from_file.to_hf()
    assert table[0] == {"input_ids": from_file.rows[0].input_ids, "labels": from_file.rows[0].labels,
                        "attention_mask": [1] * len(from_file.rows[0]), "row": 0}
    assert list(from_file.to_hf(streaming=True)) == list(table)


@pytest.mark.slow
def test_the_quickstart_script_runs_on_the_public_api_alone(tmp_path, monkeypatch, capsys):
    import ast

    from train_fixtures import write_tiny_model

    script = ROOT / "examples" / "quickstart.py"
    imported = {alias.name for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module for node in ast.walk(ast.parse(script.read_text()))
                                            if isinstance(node, ast.ImportFrom)}
    assert {name for name in imported if name and name.startswith("instructune")} == {"instructune"}

    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    model = write_tiny_model(tmp_path / "model")
    spec = importlib.util.spec_from_file_location("quickstart", script)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    out = quickstart.main(["--model", str(model), "--steps", "3", "--workdir", str(tmp_path / "work")])

    assert out["prepared"].report.rows_kept == 4
    assert out["result"].steps == 3 and out["result"].checkpoint == tmp_path / "work" / "run" / "checkpoint-3"
    assert [r["step"] for r in out["result"].metrics if r["split"] == "train"] == [1, 2, 3]
    assert out["explanation"].masked_loss_mean > 0 and len(out["answers"]) == 4
    assert all(isinstance(answer, str) for answer in out["answers"])
    assert out["evaluation"].totals.rows_scored == 4
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "work" / "prepared"))
    assert [(r["row"], r["labels"]) for r in saved] == [(r.row, r.labels) for r in out["prepared"].rows]
    printed = capsys.readouterr().out
    assert "prepared 4 rows" in printed and "trained 3 steps" in printed and "eval: response loss" in printed


def test_a_notebook_gets_a_progress_bar(monkeypatch):
    import rich.console
    from rich.progress import Progress

    from instructune.api import _progress

    with _progress() as bars:
        assert bars is None  # not a notebook: nothing drawn
    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    with pytest.warns(UserWarning, match="ipywidgets") if importlib.util.find_spec("ipywidgets") is None \
            else contextlib.nullcontext(), _progress() as bars:
        assert isinstance(bars, Progress)
    given = object()
    with _progress(given) as bars:
        assert bars is given
