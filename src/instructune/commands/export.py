"""`instructune export CHECKPOINT --gguf OUT.gguf`: a trained model as one GGUF file for llama.cpp.

CHECKPOINT is a training checkpoint (full fine-tuning or a LoRA adapter, merged into its base first),
a model folder, a .gguf file or the alias of the default model. The file carries the tokenizer, the
chat template and the end-of-turn token, so llama.cpp, llama-server and ollama chat with it as is.
"""

from __future__ import annotations

import argparse
import sys

HELP = "write a checkpoint as a GGUF file for llama.cpp (f32, f16 or q8_0)"
EXAMPLES = (
    'instructune export runs/default/checkpoint-57 --gguf model.gguf',
    'instructune export runs/default/checkpoint-57 --gguf model-q8.gguf --type q8_0',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
DESCRIPTION = ("Write a checkpoint (full fine-tuning, or a LoRA adapter merged into its base) as a GGUF file "
               "that llama.cpp runs, with the chat template and end-of-turn token in its metadata.")
TYPES = ("f32", "f16", "q8_0")  # = instructune.model.export.GGUF_TYPES, spelt out to keep --help light


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint, the output file, its storage type."""
    p.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoint-STEP), a LoRA adapter folder, a "
                                      "model folder, a .gguf file or the alias smollm2-135m-instruct")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", dest="gguf_type", choices=TYPES, default="f16",
                   help="how weights are stored: f32 (exact), f16 (half the size), q8_0 (8-bit blocks, "
                        "a quarter); norms stay f32 (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")


def run(args: argparse.Namespace) -> int:
    """Export the checkpoint; returns the exit status."""
    from instructune.api import export_gguf

    out = export_gguf(args.checkpoint, args.gguf, kind=args.gguf_type, overwrite=args.overwrite)
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({args.gguf_type}, {size_mb:.0f} MB)", file=sys.stderr)
    return 0
