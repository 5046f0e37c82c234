"""`instructune chat`: talk to a model in the terminal, with the template it was trained with."""

from __future__ import annotations

import argparse
import sys

from instructune.commands.arguments import add_model_arguments, add_sampling_arguments, add_template_argument

HELP = "talk to a model in the terminal"
EXAMPLES = (
    'instructune chat --model runs/default/checkpoint-57 --temperature 0.7',
    'printf "Which is the largest ocean?\\n/exit\\n" | instructune chat --model runs/default/checkpoint-57',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, a system prompt, and the sampling settings."""
    add_model_arguments(p)
    add_template_argument(p)
    p.add_argument("--system", help="the system prompt to start with")
    add_sampling_arguments(p, temperature=0.7, max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    """Load `--model` and chat with it until `/exit`."""
    import torch

    from instructune.use.chat import HELP as CHAT_HELP
    from instructune.use.chat import ChatSession, chat_loop
    from instructune.use.generation import check_sampling
    from instructune.use.loading import load_for_inference

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    loaded = load_for_inference(args.model, template=args.template, device=args.device,
                                trust_remote_code=args.trust_remote_code)
    session = ChatSession(loaded, system=args.system, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    template = args.template or "the model's own"
    print(f"chatting with {args.model} (template: {template}); {CHAT_HELP}", flush=True)
    chat_loop(session)
    return 0
