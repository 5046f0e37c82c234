"""A model ready to answer: loading it for inference with its chat template and stop tokens.

The template is the model's own unless the user names one: a checkpoint written by `instructune train`
carries the template it was trained with in its tokenizer, so `chat`, `generate`, `eval` and `explain`
render prompts exactly as training rendered them. Generation itself is `instructune.use.generation`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from instructune.errors import UserError


@dataclass
class LoadedModel:
    """A model, its tokenizer and the template and token ids needed to prompt it and to stop it."""

    spec: str
    model: Any
    tokenizer: Any
    template: str
    """The Jinja chat template prompts are rendered with."""
    stop_token_ids: list[int]
    """Ids that end an assistant turn (EOS and the template's end-of-turn marker)."""
    pad_token_id: int

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @classmethod
    def wrap(cls, model, tokenizer, template: str, spec: str = "(in memory)") -> LoadedModel:
        """A model already in memory (a training run's), with the stop and pad ids its template implies."""
        from instructune.data.batching import pad_token_id
        from instructune.data.templates import end_of_turn_token_ids

        return cls(spec=spec, model=model, tokenizer=tokenizer, template=template,
                   stop_token_ids=end_of_turn_token_ids(tokenizer, template), pad_token_id=pad_token_id(tokenizer))


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) means CUDA when PyTorch sees a GPU, else CPU; anything else is taken as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise UserError(f"unknown device {name!r}: {error}") from None


def load_for_inference(spec: str, *, template: str | None = None, device: str | None = None,
                       dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model spec (Hub id, folder, checkpoint, GGUF, adapter) with its template, in eval mode."""
    from instructune.data.templates import add_template_tokens, check_template_choice, resolve_template
    from instructune.model.load import load_model, load_tokenizer

    check_template_choice(template)  # a broken template file fails before the model is loaded (or converted)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    added = add_template_tokens(tokenizer, template)
    template_text = resolve_template(template, tokenizer)
    model = load_model(spec, device=resolve_device(device), dtype=dtype, trust_remote_code=trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The model never saw these markers; it can read them, but it was not trained to emit them.
        print(f"warning: the template's tokens {', '.join(added) or '(added)'} are new to this model; its answers "
              "will not end at them until it is trained with this template", file=sys.stderr)
        model.resize_token_embeddings(len(tokenizer))
    model.eval()
    return LoadedModel.wrap(model, tokenizer, template_text, spec=spec)
