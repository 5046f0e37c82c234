"""The command line: one sub-command per job. Each job lives in its own module, imported on use."""

from __future__ import annotations

import argparse
import json
import os
import sys

from instructune.errors import UserError


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", help="built-in name (alpaca, chatml, plain), a .jinja file, or omit for the tokenizer's own")
    p.add_argument("--format", dest="data_format", help="alpaca, prompt_completion, messages, sharegpt, text (default: detected)")
    p.add_argument("--train-on", choices=["assistant", "last", "all"], default="assistant")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--truncation", choices=["keep_response", "keep_start", "drop"], default="keep_response")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="instructune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="encode a dataset and show which tokens are trained")
    p.add_argument("data", help="a .json/.jsonl/.parquet/.csv file, a folder of them, or a Hugging Face dataset name")
    p.add_argument("--tokenizer", required=True, help="a Hub id, a local folder or a .gguf file")
    _add_data_arguments(p)
    p.add_argument("--limit", type=int, default=3, help="rows to show (the summary always covers all rows)")
    p.add_argument("--html", help="write a self-contained HTML page of the shown rows and the summary")
    p.add_argument("--jsonl", help="write every kept row as {row, input_ids, labels}")
    p.add_argument("--num-proc", type=int, default=None, help="worker processes for encoding (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preparation cache")

    p = sub.add_parser(
        "train", help="fine-tune a model (with no config: the default job)",
        description="Fine-tune with instruction masking. With no CONFIG, run the default job: SmolLM2-135M-Instruct "
                    "on the packaged question-answer set, with before/after answers to held-out questions.",
        epilog=_config_keys_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("arguments", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a flat YAML config file, then overrides such as lr=1e-4 or lora.r=8")

    p = sub.add_parser(
        "compare", help="train masked and unmasked runs side by side and write a report",
        description="The masked-vs-unmasked study: two runs from the same weights, rows, order and seed, one with "
                    "train_on=assistant and one with train_on=all, and a report folder (output_dir, default "
                    "runs/compare) with report.md, summary.json and plots. With no CONFIG: the default job's model "
                    "and data for one epoch. Overrides apply to both runs; train_on is set by the study.",
        epilog=_config_keys_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("arguments", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a flat YAML config file, then overrides such as lr=1e-4 or output_dir=runs/study")
    p.add_argument("--heldout", help="questions to answer before and after training (default: eval_data, else the eval split)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer (default 32)")
    p.add_argument("--examples", type=int, default=8, help="answers shown side by side in the report (default 8)")
    _add_model_use_parsers(sub)
    return parser


def _config_keys_text() -> str:
    from instructune.config import TrainConfig, field_docs

    defaults = TrainConfig().to_dict()
    lines = ["configuration keys (YAML or key=value):"]
    for name, doc in field_docs().items():
        default = json.dumps(defaults[name]) if defaults[name] is not None else "null"
        lines.append(f"  {name} (default {default}): {doc}")
    return "\n".join(lines)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a Hub id, a model folder or checkpoint, a .gguf file, a LoRA adapter folder, or smollm2-135m-instruct")
    p.add_argument("--template", help="built-in name (alpaca, chatml, plain), a .jinja file, or omit for the model's own")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repository")


def _add_sampling_arguments(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=0.9 if temperature else 1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _add_model_use_parsers(sub) -> None:
    """explain, eval, generate and chat: the sub-commands that run a model."""
    p = sub.add_parser("explain", help="per-token probabilities and losses of one example, masked vs unmasked")
    _add_model_arguments(p)
    p.add_argument("--instruction", help="the instruction (user turn) of the example")
    p.add_argument("--input", help="an Alpaca-style input that goes with --instruction")
    p.add_argument("--system", help="a system prompt for the example")
    p.add_argument("--response", help="the response (assistant turn) of the example")
    p.add_argument("--data", help="take the example from this dataset file instead (with --row)")
    p.add_argument("--row", type=int, help="the row of --data, counting from 0")
    p.add_argument("--format", dest="data_format", help="the format of --data (default: detected)")
    p.add_argument("--top-k", type=int, default=3, help="alternatives shown at each trained token (default 3)")
    p.add_argument("--html", help="write a page with the tokens coloured by loss")
    p.add_argument("--json", help="write the tokens and totals as JSON")

    p = sub.add_parser("eval", help="response loss, perplexity, token accuracy and generation metrics on a dataset")
    p.add_argument("data", nargs="?", help="a dataset file, folder or Hub name (default: the built-in held-out set)")
    _add_model_arguments(p)
    p.add_argument("--format", dest="data_format", help="alpaca, prompt_completion, messages, sharegpt, text (default: detected)")
    p.add_argument("--train-on", choices=["assistant", "last", "all"], default="assistant", help="which tokens the loss scores")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--truncation", choices=["keep_response", "keep_start", "drop"], default="keep_response")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    p.add_argument("--limit", type=int, default=None, help="generate for the first N rows only (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-generate", action="store_true", help="only the loss metrics")
    p.add_argument("--output", help="folder for rows.jsonl and totals.json")

    p = sub.add_parser("generate", help="answer prompts from a file or stdin, as JSONL")
    p.add_argument("input", nargs="?", default="-", help="JSONL of prompt records or a text file, one prompt per line (default: stdin)")
    _add_model_arguments(p)
    p.add_argument("--output", help="write the JSONL here instead of stdout")
    p.add_argument("--system", help="a system prompt for every prompt that has none")
    p.add_argument("--batch-size", type=int, default=8)
    _add_sampling_arguments(p, temperature=0.0, max_new_tokens=256)

    p = sub.add_parser("chat", help="talk to a model in the terminal")
    _add_model_arguments(p)
    p.add_argument("--system", help="the system prompt to start with")
    _add_sampling_arguments(p, temperature=0.7, max_new_tokens=256)


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from instructune.inspect_command import run_inspect

        return run_inspect(args)
    if args.command == "train":
        from instructune.train_command import run_train

        return run_train(args.arguments)
    if args.command == "compare":
        from instructune.compare_command import run_compare

        return run_compare(args.arguments, heldout=args.heldout, max_new_tokens=args.max_new_tokens,
                           examples=args.examples)
    if args.command in ("explain", "eval", "generate", "chat"):
        from instructune.chat import run_chat
        from instructune.evaluate import run_eval
        from instructune.explain import run_explain
        from instructune.generate_command import run_generate

        run = {"explain": run_explain, "eval": run_eval, "generate": run_generate, "chat": run_chat}
        return run[args.command](args)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `instructune` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `instructune inspect ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
