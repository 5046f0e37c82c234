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
from pathlib import Path

from instructune.commands.arguments import (
    add_model_arguments,
    add_sampling_arguments,
    add_template_argument,
    progress_display,
)
from instructune.errors import UserError

HELP = "answer prompts from a file or stdin, as JSONL"
EXAMPLES = (
    'echo "Which is the largest ocean?" | instructune generate - --model runs/default/checkpoint-57',
    'instructune generate prompts.jsonl --model runs/default/checkpoint-57 --output answers.jsonl',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The prompts, the model, where the answers go, and the sampling settings."""
    p.add_argument("input", nargs="?", default="-",
                   help="JSONL of prompt records or a text file, one prompt per line (default: stdin)")
    add_model_arguments(p)
    add_template_argument(p)
    p.add_argument("--output", help="write the JSONL here instead of stdout")
    p.add_argument("--system", help="a system prompt for every prompt that has none")
    p.add_argument("--batch-size", type=int, default=8)
    add_sampling_arguments(p, temperature=0.0, max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    """Answer every prompt of `args.input` (a file, or `-` for stdin) and write JSONL to `--output` or stdout."""
    from instructune.api import generate
    from instructune.data.conversation import ConversationError
    from instructune.show.jsonl import atomic_writer
    from instructune.use.generation import check_sampling
    from instructune.use.loading import load_for_inference
    from instructune.use.prompts import read_prompts, record_conversation

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
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
    with progress_display() as bars:
        responses = generate(loaded, conversations, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, progress=bars)
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
