"""`instructune explain`: per-token probabilities and losses of one example, masked vs unmasked."""

from __future__ import annotations

import argparse
import json

from instructune.commands.arguments import (
    add_format_argument,
    add_model_arguments,
    add_template_argument,
    encoding_options,
)
from instructune.errors import UserError

HELP = "per-token probabilities and losses of one example, masked vs unmasked"
EXAMPLES = (
    'instructune explain --model smollm2-135m-instruct --instruction "Which is the largest ocean?" --response "The Pacific Ocean."',
    'instructune explain --model runs/default/checkpoint-57 --data data.jsonl --row 10 --html tokens.html',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the example (by flags or from a dataset), and what to write."""
    add_model_arguments(p)
    add_template_argument(p)
    p.add_argument("--instruction", help="the instruction (user turn) of the example")
    p.add_argument("--input", help="an Alpaca-style input that goes with --instruction")
    p.add_argument("--system", help="a system prompt for the example")
    p.add_argument("--response", help="the response (assistant turn) of the example")
    p.add_argument("--data", help="take the example from this dataset file instead (with --row)")
    p.add_argument("--row", type=int, help="the row of --data, counting from 0")
    add_format_argument(p)
    p.add_argument("--top-k", type=int, default=3, help="alternatives shown at each trained token (default 3)")
    p.add_argument("--instruction-weight", type=float, metavar="W",
                   help="also show each token's loss weight under `instruction_weight: W` (in [0, 1]) and the "
                        "weighted total")
    p.add_argument("--html", help="write a page with the tokens coloured by loss")
    p.add_argument("--json", help="write the tokens and totals as JSON")


def run(args: argparse.Namespace) -> int:
    """Explain one example given by flags or by `--data FILE --row N`; print it, write `--json`/`--html`."""
    import torch
    from rich.console import Console

    from instructune.api import explain, load
    from instructune.show.jsonl import atomic_writer
    from instructune.show.tokens import special_ids
    from instructune.use.explain import (
        conversation_at,
        example_conversation,
        explanation_html,
        print_explanation,
    )

    options = encoding_options(args)  # checks --format before anything is loaded
    by_flags = args.instruction is not None or args.response is not None
    by_data = args.data is not None or args.row is not None
    if by_flags == by_data or (by_flags and (args.instruction is None or args.response is None)) or (
            by_data and (args.data is None or args.row is None)):
        raise UserError("give either --instruction and --response, or --data FILE and --row N")
    if by_flags:
        conv = example_conversation(args.instruction, args.response, input_text=args.input, system=args.system)
    else:
        conv = conversation_at(args.data, args.row, options.data_format)
    # fp32 on every device: the lesson is in the probabilities, which bf16 would blur.
    loaded = load(args.model, template=args.template, device=args.device, dtype=torch.float32,
                  trust_remote_code=args.trust_remote_code)
    explanation = explain(loaded, conv, top_k=args.top_k, instruction_weight=args.instruction_weight)

    console = Console(highlight=False)
    print_explanation(console, explanation)
    if args.json:
        with atomic_writer(args.json) as file:
            json.dump(explanation.to_json(), file, ensure_ascii=False, indent=1)
            file.write("\n")
        console.print(f"wrote {args.json}", markup=False, soft_wrap=True)
    if args.html:
        subtitle = f"model {args.model} · template {args.template or 'the model’s own'}"
        page = explanation_html(explanation, special=special_ids(loaded.tokenizer), subtitle=subtitle)
        with atomic_writer(args.html) as file:
            file.write(page)
        console.print(f"wrote {args.html}", markup=False, soft_wrap=True)
    return 0
