"""`instructune generate`: prompts from a file or stdin in, one JSON response per prompt out, batched.

Input, decided by the first non-blank line:

- **JSONL** (it starts with `{`): each object is a prompt in any of the dataset formats: `prompt`
  (a string or a list of messages), `instruction` (+ `input`, `system`, `history`), `messages` or
  `conversations` (a trailing assistant turn is left out: that is what gets answered). The output
  line is the same object with a `response` key added, so the file round-trips.
- **text**: every non-blank line is one prompt; the output line is `{"prompt": ..., "response": ...}`.

Generation is greedy (`--temperature 0`, the default) or sampled, stops at the template's end-of-turn
token, and keeps the input order whatever order the batches ran in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructune.data.conversation import Conversation, Message
from instructune.errors import UserError


def read_prompts(lines: list[str], source: str) -> tuple[list[dict[str, Any]], bool]:
    """The input records (text lines become `{"prompt": line}`) and whether the input was JSONL."""
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return [{"prompt": line.rstrip("\r\n")} for line in lines if line.strip()], False
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{source}, line {number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{source}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records, True


def record_conversation(record: dict[str, Any], system: str | None = None) -> Conversation:
    """The conversation a prompt record asks to continue (a trailing assistant turn removed)."""
    from instructune.data.formats import (
        alpaca_to_conversation,
        messages_to_conversation,
        prompt_completion_to_conversation,
        sharegpt_to_conversation,
    )
    from instructune.generation import prompt_conversation

    if "messages" in record:
        conv = messages_to_conversation(record)
    elif "conversations" in record:
        conv = sharegpt_to_conversation(record)
    elif "instruction" in record:
        conv = alpaca_to_conversation({**record, "output": ""})
    elif "prompt" in record:
        conv = prompt_completion_to_conversation({**record, "completion": ""})
    else:
        keys = ", ".join(repr(k) for k in record) or "none"
        raise UserError(f"no prompt in the record (keys: {keys}); give `prompt`, `instruction`, `messages` "
                        "or `conversations`")
    conv = prompt_conversation(conv)
    if not conv.messages or conv.messages[-1].role == "assistant":
        raise UserError("the record has nothing to answer: it needs a user turn at the end")
    if system and conv.messages[0].role != "system":
        conv.messages.insert(0, Message("system", system))
    return conv


def generate_for(loaded, conversations: list[Conversation], *, max_new_tokens: int, batch_size: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 advance: Callable[[int], None] | None = None) -> list[str]:
    """The answer to each conversation: greedy at temperature 0, else sampled; in input order."""
    from instructune.generation import encode_prompts, greedy_generate
    from instructune.inference import check_sampling, sample_generate

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


def run_generate(args: argparse.Namespace) -> int:
    """Answer every prompt of `args.input` (a file, or `-` for stdin) and write JSONL to `--output` or stdout."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from instructune.data.conversation import ConversationError
    from instructune.inference import check_sampling, load_for_inference
    from instructune.show.jsonl import atomic_writer

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    source = "stdin" if args.input == "-" else args.input
    if args.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read {args.input}: {getattr(error, 'strerror', None) or error}") from None
    records, _ = read_prompts(lines, source)
    if not records:
        raise UserError(f"{source}: no prompts (the input is empty)")
    conversations = []
    for number, record in enumerate(records, start=1):
        try:
            conversations.append(record_conversation(record, args.system))
        except (UserError, ConversationError) as error:
            raise UserError(f"{source}, prompt {number}: {error}") from None

    loaded = load_for_inference(args.model, template=args.template, device=args.device,
                                trust_remote_code=args.trust_remote_code)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # after loading, which may draw random numbers of its own
    bars = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)
    with bars:
        task = bars.add_task("generating", total=len(conversations))
        responses = generate_for(loaded, conversations, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                                 advance=lambda n: bars.advance(task, n))
    lines_out = [json.dumps({**record, "response": response}, ensure_ascii=False) + "\n"
                 for record, response in zip(records, responses)]
    if args.output:
        with atomic_writer(args.output) as file:
            file.writelines(lines_out)
        print(f"wrote {len(lines_out)} response(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.writelines(lines_out)
        sys.stdout.flush()
    return 0
