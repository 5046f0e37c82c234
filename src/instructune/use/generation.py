"""Generation, once: greedy or sampled, batched with left padding, stopping at the end of a turn, or streamed.

Prompts are rendered and tokenized exactly as training renders them (`ConversationEncoder.render`
with the generation prompt, then `ConversationEncoder.tokenize`), so the model sees at inference
the very token sequence it was trained to continue. Decoding is a hand-written loop over the KV
cache (`decode_steps`) that computes only the last position's logits (`logits_to_keep=1`). It gives the same
greedy tokens as `model.generate`, as fast on SmolLM2-135M and faster on small models where the
per-step overhead shows (`bench/generation_bench.py`), and it streams as a plain Python generator.
Every caller goes through it: `eval`, `generate`, `chat`, `compare`, the default job.

- `generate_ids`: the new token ids of each prompt (ids in, ids out), batched by similar length.
- `answer_conversations`: the decoded answer to each conversation of a `LoadedModel`.
- `stream_answer`: one answer as text pieces, as they are decoded.

Temperature 0 is greedy (argmax); above 0 the logits are divided by the temperature and sampled
from the smallest set of tokens whose probability reaches `top_p`. A `seed` makes sampling
reproducible without touching the global random state; without one the global generator is used.
A returned answer never includes its stop token; one shorter than `max_new_tokens` ended at a stop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from instructune.data.conversation import Conversation
from instructune.errors import UserError

if TYPE_CHECKING:
    from instructune.use.loading import LoadedModel


def _forward_parameters(model) -> set[str]:
    """The named parameters of the model's own forward (a PEFT wrapper's base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (it then computes only the logits asked for)."""
    return "logits_to_keep" in _forward_parameters(model)


def check_sampling(*, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
    """Raise a `UserError` for generation settings out of range (the ranges of `instructune.ranges.SETTING_RANGES`,
    which the command line checks before loading; this guards callers of the functions below)."""
    from instructune.ranges import setting_problem

    for name, value in (("temperature", temperature), ("top_p", top_p), ("max_new_tokens", max_new_tokens)):
        problem = setting_problem(name, value)
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {problem}")


def prompt_conversation(conv: Conversation) -> Conversation:
    """The conversation up to (not including) its final assistant turn: what the model must answer."""
    messages = list(conv.messages)
    if messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return Conversation(messages=messages, tools=conv.tools)


def encode_prompts(tokenizer, template: str, conversations: list[Conversation]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt (an assistant turn opened)."""
    from instructune.data.encode import ConversationEncoder

    encoder = ConversationEncoder(tokenizer, template)
    return [encoder.tokenize(encoder.render(conv, add_generation_prompt=True)[0])[0] for conv in conversations]


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the prompts padded on the left to the longest one.

    Left padding keeps every row's last prompt token in the last column, where generation goes on.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def token_picker(temperature: float, top_p: float, seed: int | None,
                 device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from last-position logits [rows, vocab] to the next token of each row."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1:
            ranked, order = probs.sort(dim=-1, descending=True)
            # A token goes when the more likely ones already reach top_p; the most likely always stays.
            ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ranked)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


@torch.no_grad()
def decode_steps(model, ids: torch.Tensor, mask: torch.Tensor, *, pad_token_id: int, stop_token_ids: list[int],
                 max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[torch.Tensor]:
    """The next token of every row, one decoding step at a time, until every row stopped or the limit.

    A row that has stopped is fed padding from then on; callers cut each row at its first stop token.
    """
    stop = torch.tensor(stop_token_ids or [-1], device=ids.device)
    parameters = _forward_parameters(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers renamed `past_key_values` to `cache` (5.2x); the old name goes in 5.40.
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        next_ids = pick(out.logits[:, -1]).masked_fill(done, pad_token_id)
        yield next_ids
        done |= torch.isin(next_ids, stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        cache = getattr(out, "cache", None)
        extra[cache_name] = cache if cache is not None else out.past_key_values
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **extra)


@dataclass
class GenerationProgress:
    """Where a `generate_ids` call stands, after each decoding step (for a progress display)."""

    prompts: int
    """All the prompts of the call."""
    answered: int
    """Prompts whose answer is complete: it stopped, or reached `max_new_tokens`."""
    tokens: int
    """New tokens so far, stop tokens included, over all rows."""
    steps: int
    """Decoding steps so far, over all batches (the first of a batch includes its prompt's forward)."""
    max_steps: int
    """The most steps the call can take: the steps of the finished batches, `max_new_tokens` for each
    other batch. It shrinks when a batch stops early, so it bounds the time left from above."""


def _cut_at_stop(ids: list[int], stop_token_ids: list[int]) -> list[int]:
    """The ids before the first stop token (all of them when there is none)."""
    return next((ids[:k] for k, token in enumerate(ids) if token in stop_token_ids), ids)


def generate_ids(model, prompts: list[list[int]], *, stop_token_ids: list[int], pad_token_id: int,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 batch_size: int = 8, on_batch: Callable[[int], None] | None = None,
                 on_step: Callable[[GenerationProgress], None] | None = None) -> list[list[int]]:
    """The new ids of each prompt (without the stop token), in input order, batched by similar length.

    `on_batch(n)` is called after every batch of n prompts, `on_step` after every decoding step.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    pick = token_picker(temperature, top_p, seed, device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    batches = -(-len(order) // batch_size)
    progress = GenerationProgress(len(prompts), 0, 0, 0, batches * max_new_tokens)
    stop = torch.tensor(stop_token_ids or [-1])
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            ids, mask = left_pad([prompts[i] for i in chosen], pad_token_id)
            steps, done = [], torch.zeros(len(chosen), dtype=torch.bool)
            for next_ids in decode_steps(model, ids.to(device), mask.to(device), pad_token_id=pad_token_id,
                                         stop_token_ids=stop_token_ids, max_new_tokens=max_new_tokens, pick=pick):
                steps.append(next_ids)
                if on_step is not None:
                    progress.tokens += int((~done).sum())
                    done |= torch.isin(next_ids.cpu(), stop)
                    progress.steps += 1
                    last = len(steps) == max_new_tokens or bool(done.all())
                    progress.answered = start + (len(chosen) if last else int(done.sum()))
                    if last:  # this batch ends here: its unused steps no longer count
                        progress.max_steps -= max_new_tokens - len(steps)
                    on_step(progress)
            tokens = torch.stack(steps, dim=1).tolist()
            for row, i in enumerate(chosen):
                results[i] = _cut_at_stop(tokens[row], stop_token_ids)
            if on_batch is not None:
                on_batch(len(chosen))
    finally:
        model.train(was_training)
    return results


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Generated ids as answer text: special tokens left out, surrounding whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer_conversations(loaded: LoadedModel, conversations: list[Conversation], *, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                         batch_size: int = 8, on_batch: Callable[[int], None] | None = None,
                         on_step: Callable[[GenerationProgress], None] | None = None) -> list[str]:
    """The answer to each conversation (without its final assistant turn, if any), decoded, in input order."""
    prompts = encode_prompts(loaded.tokenizer, loaded.template, [prompt_conversation(c) for c in conversations])
    outputs = generate_ids(loaded.model, prompts, stop_token_ids=loaded.stop_token_ids,
                           pad_token_id=loaded.pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, batch_size=batch_size, on_batch=on_batch, on_step=on_step)
    return [decode_answer(loaded.tokenizer, ids) for ids in outputs]


def stream_answer(loaded: LoadedModel, prompt: list[int] | Conversation, *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None) -> Generator[str, None, list[int]]:
    """One answer as text pieces, each given as soon as it decodes to whole characters.

    `prompt` is token ids or a conversation (answered like `answer_conversations` does). The pieces
    join to `tokenizer.decode(ids, skip_special_tokens=True)` of the answer's ids (not stripped),
    which are the generator's return value (`StopIteration.value`). Text is held back while a longer
    decode does not extend what was given (a partial character), so joining is exact for tokenizers
    whose decoding only ever extends (byte-level BPE, SentencePiece).
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if isinstance(prompt, Conversation):
        prompt = encode_prompts(loaded.tokenizer, loaded.template, [prompt_conversation(prompt)])[0]
    model, device = loaded.model, loaded.device
    ids, mask = left_pad([prompt], loaded.pad_token_id)
    answer: list[int] = []
    shown = ""
    was_training = model.training
    model.eval()
    try:
        for token in decode_steps(model, ids.to(device), mask.to(device), pad_token_id=loaded.pad_token_id,
                            stop_token_ids=loaded.stop_token_ids, max_new_tokens=max_new_tokens,
                            pick=token_picker(temperature, top_p, seed, device)):
            if int(token) in loaded.stop_token_ids:
                break
            answer.append(int(token))
            text = loaded.tokenizer.decode(answer, skip_special_tokens=True)
            # A token can end inside a character (byte-level BPE): wait for the rest of its bytes.
            if text.startswith(shown) and not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
    finally:
        model.train(was_training)
    text = loaded.tokenizer.decode(answer, skip_special_tokens=True)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
    return answer
