"""Batched greedy generation with a chat template, stopping at EOS or the end-of-turn marker.

Prompts are rendered and tokenized exactly as training renders them (`ConversationEncoder.render`
with the generation prompt, then `ConversationEncoder.tokenize`), so the model sees at inference
the very token sequence it was trained to continue. Batches are left-padded and decoded with the KV
cache; only the last position's logits are computed at each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from instructune.data.conversation import Conversation
from instructune.data.encode import ConversationEncoder
from instructune.data.templates import end_of_turn_token_ids
from instructune.errors import UserError


def prompt_conversation(conv: Conversation) -> Conversation:
    """The conversation up to (not including) its final assistant turn: what the model must answer."""
    messages = list(conv.messages)
    if messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return Conversation(messages=messages, tools=conv.tools)


def encode_prompts(tokenizer, template: str, conversations: list[Conversation]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (an assistant turn opened)."""
    encoder = ConversationEncoder(tokenizer, template)
    return [encoder.tokenize(encoder.render(conv, add_generation_prompt=True)[0])[0] for conv in conversations]


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], *, pad_token_id: int, stop_token_ids: list[int],
                    max_new_tokens: int = 64, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (without the stop token), batched by similar length.

    Results are in input order; `on_batch(n)` is called after every batch of n prompts.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = torch.tensor(stop_token_ids or [-1], device=device)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        # Left padding keeps every row's last prompt token in the last column.
        ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        done = torch.zeros(len(chosen), dtype=torch.bool, device=device)
        generated = []
        for _ in range(max_new_tokens):
            # A finished row is fed padding; its output is cut at its first stop token below.
            next_ids = out.logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
            generated.append(next_ids)
            done |= torch.isin(next_ids, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True, **extra)
        tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in chosen]
        for row, i in enumerate(chosen):
            stop_at = next((k for k, t in enumerate(tokens[row]) if t in stop_token_ids), len(tokens[row]))
            results[i] = tokens[row][:stop_at]
        if on_batch is not None:
            on_batch(len(chosen))
    model.train(was_training)
    return results


def generate_responses(model, tokenizer, template: str, conversations: list[Conversation], *,
                       max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy answers to each conversation's last instruction, decoded without special tokens."""
    prompts = encode_prompts(tokenizer, template, [prompt_conversation(c) for c in conversations])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = greedy_generate(model, prompts, pad_token_id=pad if pad is not None else 0,
                              stop_token_ids=end_of_turn_token_ids(tokenizer, template),
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


def generate_for(loaded, conversations: list[Conversation], *, max_new_tokens: int, batch_size: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 advance: Callable[[int], None] | None = None) -> list[str]:
    """The answer to each conversation: greedy at temperature 0, else sampled; in input order."""
    from instructune.use.loading import check_sampling, sample_generate

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    prompts = encode_prompts(loaded.tokenizer, loaded.template, conversations)
    if temperature > 0:
        outputs = sample_generate(loaded, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, batch_size=batch_size, on_batch=advance)
    else:
        outputs = greedy_generate(loaded.model, prompts, pad_token_id=loaded.pad_token_id,
                                  stop_token_ids=loaded.stop_token_ids, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, on_batch=advance)
    return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
