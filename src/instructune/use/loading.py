"""A model ready to answer: loading it with its chat template, and sampled or streamed generation.

The template is the model's own unless the user names one: a checkpoint written by `instructune train`
carries the template it was trained with in its tokenizer, so `chat`, `generate`, `eval` and `explain`
render prompts exactly as training rendered them. Greedy batched generation lives in
`instructune.use.generation`; this module adds what that one does not do: temperature/top-p sampling and
streaming, both through `model.generate`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
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
    from instructune.data.templates import add_template_tokens, end_of_turn_token_ids, resolve_template
    from instructune.model.load import load_model, load_tokenizer

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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, template=template_text,
                       stop_token_ids=end_of_turn_token_ids(tokenizer, template_text),
                       pad_token_id=pad if pad is not None else 0)


def check_sampling(*, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
    """Raise a `UserError` for generation flags out of range (before any time goes into loading)."""
    if temperature < 0 or math.isnan(temperature):
        raise UserError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def generation_config(loaded: LoadedModel, *, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0):
    """A complete `GenerationConfig`: greedy at temperature 0, else sampling; stops at the end of a turn.

    A fresh config (not the model's own `generation_config`) so that defaults shipped with a model
    (a repetition penalty, its own temperature) never change what the flags say.
    """
    from transformers import GenerationConfig

    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=loaded.stop_token_ids,
                            pad_token_id=loaded.pad_token_id, **sampling)


def _cut_at_stop(ids: list[int], stop_token_ids: list[int], pad_token_id: int) -> list[int]:
    """The generated ids up to (not including) the first stop token; trailing padding goes too."""
    for k, token in enumerate(ids):
        if token in stop_token_ids:
            return ids[:k]
    while ids and ids[-1] == pad_token_id:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def sample_generate(loaded: LoadedModel, prompts: list[list[int]], *, max_new_tokens: int,
                    temperature: float, top_p: float = 1.0, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Sampled (or, at temperature 0, greedy) continuations of each prompt, batched with left padding.

    Returns the new ids of each prompt without the stop token; `on_batch(n)` is called after every batch.
    """
    config = generation_config(loaded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    device = loaded.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        # Left padding: every row's last prompt token sits in the last column, where generation goes on.
        ids = torch.full((len(chosen), width), loaded.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = loaded.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config)
        for row, i in enumerate(chosen):
            results[i] = _cut_at_stop(out[row, width:].tolist(), loaded.stop_token_ids, loaded.pad_token_id)
        if on_batch is not None:
            on_batch(len(chosen))
    return results


def stream_generate(loaded: LoadedModel, prompt: list[int], write: Callable[[str], None], *,
                    max_new_tokens: int, temperature: float, top_p: float = 1.0) -> list[int]:
    """Generate one answer, handing its text to `write` piece by piece as it is decoded; returns its ids."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        # TextStreamer prints; this one hands the text over, so the caller decides where it goes.
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    config = generation_config(loaded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    streamer = _Streamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = torch.tensor([prompt], device=loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                    streamer=streamer)
    return _cut_at_stop(out[0, len(prompt):].tolist(), loaded.stop_token_ids, loaded.pad_token_id)
