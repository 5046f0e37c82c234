"""instructune from Python, using only its public API: prepare data, train, explain, generate, evaluate.

    python examples/quickstart.py                        # SmolLM2-135M-Instruct on a few rows (minutes on a CPU)
    python examples/quickstart.py --model DIR --steps 4  # any model folder, Hub id or .gguf file

Every step returns an object (nothing here reads printed output), and a mistake in the input raises
`instructune.UserError` with the message the command line would print.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import instructune

ROWS = [
    {"instruction": "Which is the largest ocean?", "output": "The Pacific Ocean."},
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France."},
    {"instruction": "How many legs does a spider have?", "output": "A spider has eight legs."},
    {"instruction": "What colour is the sky on a clear day?", "output": "Blue."},
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a Hub id, a folder or a .gguf file")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--workdir", help="where the data and the run go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="instructune-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # 1. Prepare: rows in memory (or a file, a folder, a Hub dataset) -> input_ids + exact labels.
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    prepared = instructune.encode(ROWS, args.model, max_length=256, cache=False)
    print(f"prepared {prepared.report.rows_kept} rows, {prepared.report.trained_fraction:.0%} of tokens trained")
    instructune.save_prepared(prepared, workdir / "prepared")  # datasets.load_from_disk(...) reads it

    # 2. Train: the run `instructune train` makes, configured with keywords instead of a YAML file.
    result = instructune.train(model=args.model, data=str(data), output_dir=str(workdir / "run"),
                               max_steps=args.steps, batch_size=2, lr=1e-4, eval_fraction=0, log_every=1,
                               quiet=True)
    losses = [record["loss"] for record in result.metrics if record["split"] == "train"]
    print(f"trained {result.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}; model in {result.checkpoint}")

    # 3. Explain one example under the trained model: what the masked loss scores, token by token.
    model = instructune.load(result.checkpoint, device="cpu")
    explanation = instructune.explain(model, ROWS[0])
    print(f"explain: response loss {explanation.masked_loss_mean:.3f}, "
          f"instruction and response {explanation.unmasked_loss_mean:.3f}")

    # 4. Generate answers.
    answers = instructune.generate(model, [row["instruction"] for row in ROWS], max_new_tokens=16)
    for row, answer in zip(ROWS, answers):
        print(f"{row['instruction']} -> {answer!r}")

    # 5. Evaluate: response loss and token accuracy on the same rows.
    evaluation = instructune.evaluate(model, str(data), generate=False)
    print(f"eval: response loss {evaluation.totals.loss:.3f}, token accuracy {evaluation.totals.token_accuracy:.0%}")
    return {"prepared": prepared, "result": result, "explanation": explanation, "answers": answers,
            "evaluation": evaluation, "workdir": workdir}


if __name__ == "__main__":
    main()
