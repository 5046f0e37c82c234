"""`instructune export`: a checkpoint to a GGUF file, the `export_gguf` config key, and every bad input."""

from __future__ import annotations

import os
import stat

import gguf
import numpy as np
import pytest

from instructune.cli import main
from instructune.model.export.llama_cpp_run import open_gguf, prompt_logits
from instructune.train.config import load_config
from instructune.train.loop import train
from model_fixtures import SAMPLE, logits_of
from train_fixtures import quick_settings, write_tiny_model, write_toy_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip()


def test_export_writes_a_gguf_that_llama_cpp_runs(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["export", str(checkpoint), "--gguf", str(out), "--type", "f32"]) == 0
    assert f"wrote {out} (f32" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left behind
    from instructune.model.load import load_model, load_tokenizer

    ids = load_tokenizer(str(checkpoint))(SAMPLE).input_ids
    with open_gguf(out, threads=1) as llm:
        np.testing.assert_allclose(prompt_logits(llm, ids), logits_of(load_model(str(checkpoint)), ids)[0].numpy(),
                                   rtol=0, atol=1e-4)
    # --overwrite replaces it (here with the default type, f16: half the matrix bytes).
    assert main(["export", str(checkpoint), "--gguf", str(out), "--overwrite"]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["export", str(tmp_path / "runs" / "default" / "checkpoint-9"), "--gguf", str(out)]) == 2
    assert error_of(capsys) == (f"error: checkpoint not found: {tmp_path}/runs/default/checkpoint-9 (give a checkpoint "
                                "folder such as runs/default/checkpoint-57, a model folder or a .gguf file)")
    assert not out.exists()


def test_folder_without_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "is not a model folder: it has no config.json" in error_of(capsys)


def test_bad_type_is_refused_by_the_parser(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--gguf", str(tmp_path / "m.gguf"), "--type", "q4_0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # argparse quotes the choices or not, by Python version
    assert "argument --type: invalid choice: 'q4_0' (choose from " in err and "q8_0" in err.splitlines()[-1]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_exported_file_has_the_mode_the_umask_gives(checkpoint, tmp_path, capsys, umask, mode):
    # Written through mkstemp (0600) and renamed into place: it must still look like any file the user writes.
    out = tmp_path / "model.gguf"
    previous = os.umask(umask)
    try:
        assert main(["export", str(checkpoint), "--gguf", str(out), "--type", "f32"]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_existing_output_is_kept_without_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    assert main(["export", str(checkpoint), "--gguf", str(out)]) == 2
    assert error_of(capsys) == f"error: {out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"precious"


def test_output_must_be_a_gguf_file(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), "--gguf", str(tmp_path / "model.bin")]) == 2
    assert error_of(capsys) == f"error: the GGUF output {tmp_path / 'model.bin'} should end in .gguf"


def test_export_gguf_key_writes_the_final_model_at_the_end_of_training(checkpoint, tmp_path):
    data = write_toy_data(tmp_path / "data.jsonl", rows=8)
    out = tmp_path / "out" / "final.gguf"
    settings = quick_settings(checkpoint, data, tmp_path / "run", max_steps=2, export_gguf=str(out),
                              export_gguf_type="q8_0")
    result = train(load_config(None, settings))
    assert result.gguf == out and out.is_file()
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    # The file holds the final checkpoint: its embedding, de-quantised, is that checkpoint's within q8_0's step.
    from instructune.model.load import load_model

    trained = load_model(str(result.checkpoint)).get_input_embeddings().weight.detach().numpy()
    stored = next(t for t in reader.tensors if t.name == "token_embd.weight")
    back = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(trained.shape)
    # q8_0 stores w = q * d per block of 32 (here a row), d = max|w| / 127 rounded to f16 (2^-11 relative):
    # |error| <= d / 2 + 127 * d * 2^-11.
    step = np.abs(trained).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back - trained) <= step * (0.5 + 127 * 2.0**-11))
    assert np.abs(back - trained).max() > 0  # it was quantised


def test_export_gguf_key_refuses_an_existing_file_before_training(checkpoint, tmp_path):
    from instructune.errors import UserError

    data = write_toy_data(tmp_path / "data.jsonl", rows=8)
    out = tmp_path / "final.gguf"
    out.write_bytes(b"precious")
    settings = quick_settings(checkpoint, data, tmp_path / "run", max_steps=2, export_gguf=str(out))
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        train(load_config(None, settings))
    assert out.read_bytes() == b"precious" and not (tmp_path / "run").exists()


def test_export_gguf_key_must_name_a_gguf_file(checkpoint, tmp_path):
    from instructune.errors import UserError

    with pytest.raises(UserError, match="export_gguf"):
        load_config(None, [f"model={checkpoint}", "export_gguf=model.bin"])


def test_the_command_offers_exactly_the_types_the_exporter_writes():
    from instructune.commands.export import TYPES
    from instructune.model.export import GGUF_TYPES
    from instructune.train.config import CHOICES

    assert TYPES == GGUF_TYPES == CHOICES["export_gguf_type"]
