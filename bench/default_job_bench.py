"""The default job's parts, timed on this machine and scaled to a slower one by the fp32 matmul rate.

`instructune train` with no arguments sets up (data, model), evaluates and answers the 62 held-out questions
with the base model, trains 57 steps, then answers them again. This script times each part with the job's
own functions and settings, in one process:

- the fp32 matmul rate: a 2048x2048 product, best of 10 (`train_bench.py`'s figure), before and after;
- setup (`setup_run`, the converted model already cached), the base model's evaluation, the weights
  fingerprint that keys the cache of base answers (`use.answer_cache`);
- answering the held-out questions with the base model and, with `--checkpoint`, with a fine-tuned one, at
  each of `--batches` (alternating, `--repeats` times; the answers must be the same at every batch size);
- with `--train-steps N`: N steps of the job's training; its tokens/s (steps 2..N) times the job's tokens.

Each part is then scaled to `--target-gflops` (default 70) by the rate ratio: a planning figure, not a
measurement (decoding reads the weights more than it multiplies, so it scales less cleanly than training).
Other processes slow every part: the `uptime` load is printed before and after; prefer a quiet machine.

Run: .venv/bin/python bench/default_job_bench.py --checkpoint runs/default/checkpoint-57
     .venv/bin/python bench/default_job_bench.py --batches 16,64 --repeats 3 --train-steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import _timed, child_peak  # noqa: E402  (one matmul probe and timer for every benchmark)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a fine-tuned default-job checkpoint, to time its answers too")
    parser.add_argument("--batches", default="16,64", help="generation batch sizes to compare (default 16,64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0, help="time this many training steps (0: none)")
    parser.add_argument("--target-gflops", type=float, default=70.0)
    args = parser.parse_args()
    from instructune.train.openmp import bound_openmp_spinning

    bound_openmp_spinning()  # as `instructune train` does, before torch loads OpenMP
    import torch

    from instructune.model.load import load_model
    from instructune.study.default_job import MAX_NEW_TOKENS, default_job_config, load_heldout
    from instructune.train.loop import evaluate, fit
    from instructune.train.metrics import read_metrics
    from instructune.train.setup import setup_run
    from instructune.use.answer_cache import weights_fingerprint
    from instructune.use.generation import answer_conversations
    from instructune.use.loading import LoadedModel

    print(f"uptime load {_load()}; {torch.get_num_threads()} threads", flush=True)
    peaks = [child_peak()["gflops"]]
    print(f"fp32 matmul {peaks[0]:.0f} GFLOP/s", flush=True)
    parts: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = setup_run(default_job_config([f"output_dir={tmp}/run"]), name="default")
        parts["setup (model cached)"] = [time.perf_counter() - started]
        parts["base model: evaluation"] = [_timed(lambda: evaluate(run))]
        parts["base model: weights fingerprint"] = [_timed(lambda: weights_fingerprint(run.model))]
        conversations = [q.conversation for q in load_heldout(Path(run.config.eval_data))]
        models = {"base model": run.model}
        if args.checkpoint:
            models["fine-tuned model"] = load_model(args.checkpoint, device="cpu", dtype=torch.float32)
        batches = [int(b) for b in args.batches.split(",")]
        for which, model in models.items():
            loaded = LoadedModel.wrap(model, run.tokenizer, run.template)
            answers = {}
            for repeat in range(args.repeats):
                for size in batches if repeat % 2 == 0 else batches[::-1]:
                    start = time.perf_counter()
                    answers[size] = answer_conversations(loaded, conversations, max_new_tokens=MAX_NEW_TOKENS,
                                                         batch_size=size)
                    spent = time.perf_counter() - start
                    parts.setdefault(f"{which}: answers, batch {size}", []).append(spent)
                    print(f"{which}, batch {size}: {spent:.1f} s (load {_load()})", flush=True)
            if answers and any(a != answers[batches[0]] for a in answers.values()):
                print(f"{which}: the answers differ between batch sizes", flush=True)
                return 1
            print(f"{which}: the same answers at every batch size", flush=True)
        if args.train_steps:
            train_run = setup_run(default_job_config([f"output_dir={tmp}/train", f"max_steps={args.train_steps}"]),
                                  name="default")
            job_tokens = sum(train_run.plan.lengths)  # one epoch of the job: every training row once
            fit(train_run)
            steps = [r for r in read_metrics(Path(tmp) / "train") if r["split"] == "train"]
            # Steps 2..N: the first one also warms up (allocations, OpenMP's threads).
            rate = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
            parts[f"training: 57 steps at {rate:.0f} tokens/s (steps 2-{args.train_steps})"] = [job_tokens / rate]
    peaks.append(child_peak()["gflops"])
    peak = max(peaks)
    scale = peak / args.target_gflops
    print(f"\nuptime load {_load()}; fp32 matmul {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s: best {peak:.0f}")
    print(f"{'part':<62} {'measured s (best; all)':>30} {f'scaled to {args.target_gflops:.0f} GFLOP/s':>22}")
    for name, times in parts.items():
        shown = ", ".join(f"{t:.1f}" for t in times)
        print(f"{name:<62} {min(times):>8.1f} ({shown})".ljust(93) + f" {min(times) * scale:>14.0f} s")
    print(f"(median of each: {', '.join(f'{statistics.median(t):.1f}' for t in parts.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
