"""LoRA: wrap a model with low-rank adapters (peft), merge them back, recognise adapter folders.

Settings are a small mapping, as written in a YAML config under `lora:`:

    r: 16                      # rank of the update matrices
    alpha: 32                  # scale numerator: the update is multiplied by alpha / r (default 2 * r)
    dropout: 0.0               # dropout on the adapter's input
    target_modules: all-linear # every linear layer except the output head, or a list of module names

peft is an optional dependency (`pip install 'instructune[lora]'`) and is imported only when used.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from instructune.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

LORA_SETTINGS = ("r", "alpha", "dropout", "target_modules")
"""The keys a LoRA settings mapping may have."""

_SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
             "targets": "target_modules", "target": "target_modules", "modules": "target_modules"}


def is_lora_adapter_folder(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder holding a peft adapter (it has adapter_config.json)."""
    return (Path(path) / "adapter_config.json").is_file()


def apply_lora(model: PreTrainedModel, lora: Mapping[str, Any] | None = None) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapter weights are left trainable."""
    peft = import_peft()
    if isinstance(model, peft.PeftModel):
        raise UserError("the model already carries a LoRA adapter; merge it (merge_lora) before adding another")
    config = peft.LoraConfig(task_type="CAUSAL_LM", bias="none", **_lora_config_kwargs(lora or {}))
    try:
        with quiet_peft():
            return peft.get_peft_model(model, config)
    except ValueError as error:
        # peft says so when target_modules matches no layer of this architecture.
        raise UserError(f"LoRA target_modules {config.target_modules!r} do not fit this model: {error}") from None


def merge_lora(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """Fold the LoRA updates into the base weights and return the plain model (a plain model is returned as is).

    The merge happens in place: the base model's weights change, so the adapter model must not be used after.
    """
    try:
        from peft import PeftModel
    except ImportError:
        return model  # without peft there can be no adapter on the model
    if not isinstance(model, PeftModel):
        return model
    # safe_merge refuses to write NaN weights instead of saving a broken model silently.
    return model.merge_and_unload(safe_merge=True)


def _lora_config_kwargs(lora: Mapping[str, Any]) -> dict[str, Any]:
    """Check the user's LoRA settings and translate them into `peft.LoraConfig` keyword arguments."""
    if not isinstance(lora, Mapping):
        raise UserError(f"LoRA settings must be a mapping like {{r: 16, alpha: 32}}, not {type(lora).__name__}")
    for key in lora:
        if key not in LORA_SETTINGS:
            guess = _SYNONYMS.get(str(key)) or next(iter(difflib.get_close_matches(str(key), LORA_SETTINGS, 1)), None)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            raise UserError(f"unknown LoRA setting '{key}'{hint}; the settings are: {', '.join(LORA_SETTINGS)}")
    r = lora.get("r", 16)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"LoRA r (the rank) must be a positive whole number, not {r!r}")
    alpha = lora.get("alpha", 2 * r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"LoRA alpha must be a positive number, not {alpha!r}")
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be a number in [0, 1), not {dropout!r}")
    targets = lora.get("target_modules", "all-linear")
    if isinstance(targets, (list, tuple)):
        if not targets or not all(isinstance(name, str) and name for name in targets):
            raise UserError(f"LoRA target_modules must be 'all-linear' or a list of module names, not {targets!r}")
        targets = list(targets)
    elif not isinstance(targets, str) or not targets:
        raise UserError(f"LoRA target_modules must be 'all-linear' or a list of module names, not {targets!r}")
    # peft's "all-linear" already leaves out the output head (lm_head), which stays frozen.
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets}


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide the FutureWarning transformers 5 raises when peft wraps a model (peft still reads the
    deprecated `is_gradient_checkpointing`); wrap `get_peft_model` and `PeftModel.from_pretrained` in it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def import_peft() -> ModuleType:
    """The `peft` module, or a `UserError` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs the `peft` package: pip install 'instructune[lora]'") from None
    return peft
