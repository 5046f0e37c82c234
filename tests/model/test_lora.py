"""LoRA: which parameters train, merging back into the base model, and bad settings."""

from __future__ import annotations

import re

import pytest
import torch

from instructune.errors import UserError
from instructune.model.lora import apply_lora, merge_lora
from instructune.testing import make_tiny_model
from model_fixtures import logits_of, perturb_adapters


def test_apply_lora_leaves_only_adapters_trainable():
    model = make_tiny_model(100, tie_word_embeddings=True)
    peft_model = apply_lora(model, {"r": 4})
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # "all-linear": every projection of every layer, never the output head.
    assert sum("q_proj.lora_A" in name for name in trainable) == 2
    assert not any("lm_head" in name for name in trainable)
    assert peft_model.peft_config["default"].lora_alpha == 8


def test_apply_lora_prints_no_deprecation_warning():
    """peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on every LoRA run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(make_tiny_model(100), {"r": 2})
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_merge_lora_gives_the_adapter_models_logits():
    model = make_tiny_model(100)
    base_logits = logits_of(model, [5, 6, 7, 8])
    peft_model = apply_lora(model, {"r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}).eval()
    perturb_adapters(peft_model)
    adapted = logits_of(peft_model, [5, 6, 7, 8])
    assert not torch.allclose(adapted, base_logits)
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, [5, 6, 7, 8]), adapted, rtol=1e-5, atol=1e-5)
    assert merge_lora(merged) is merged


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
