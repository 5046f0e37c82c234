"""Scaling report: how training speed and peak memory grow with what a run is given.

Part `length` (`sequence_length_curve`): SmolLM2-135M-Instruct (fp32, CPU, full fine-tuning), one row
of L tokens per optimizer step, L = 512, 2k, 4k, 8k (16k with `--lengths`). Each point runs in its own
fresh process (`train_bench.py`'s children: the same set-up as workload A, `batch_size` 1, `max_length`
L), so its peak RSS (`ru_maxrss`) is that point's alone; tokens/s is the training loop's, first step
included. Sides: `instructune` (automatic `max_tokens_per_forward`), `instructune-budget` (a fixed
budget, `--budget`, so that longer rows recompute their activations) and `trl` (SFTTrainer as a
user gets it, gradient checkpointing on) up to `--trl-max-length`. Rows: Alpaca instructions with
responses made of several Alpaca outputs, cut to L tokens by both sides alike.

Writes `<out>/scale_length.png` (tokens/s and peak RSS against L) and `<out>/scale_length.md` (the
table, with the machine's load), and prints the table.

Part `data` (`data_size_curve`): preparation of 10k, 100k and 1M rows made by varying the 999 demo
Alpaca rows (a numbered prefix or suffix on the instruction), by instructune (`prepare_dataset` with a
fresh cache: streamed, sharded, parallel over the cores; then again from that cache) and by TRL
(`SFTTrainer._prepare_dataset`, as in `prepare_bench.py`, `dataset_num_proc` None and 2, from an Arrow
dataset on disk built outside the timing). Every point runs in a fresh process and reports wall and CPU
seconds, rows/s and peak RSS (its own, and its largest worker's). TRL beyond `--trl-max-rows` (100k) is
estimated from its rows/s at the largest size it ran; the table says so. Writes `<out>/scale_data.png`,
`scale_data.md` and `scale_data.json`.

Run: .venv/bin/python bench/scale_bench.py --part length                 (~10 min on 2 busy cores)
     nice -n 5 .venv/bin/python bench/scale_bench.py --part data --work /tmp   (~40 min on 2 busy cores)
     .venv/bin/python bench/scale_bench.py --part length --lengths 512,2048 --sides instructune
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench  # noqa: E402  (the children and the TRL side are shared with the training benchmark)

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (512, 2048, 4096, 8192)
LENGTH_SIDES = ("instructune", "instructune-budget", "trl")


def long_rows(rows: int, length: int, folder: Path) -> Path:
    """`rows` Alpaca-style rows whose responses (several Alpaca outputs joined) exceed `length` tokens."""
    records = json.loads(train_bench.ALPACA.read_text(encoding="utf-8"))
    out, cursor = [], 0
    for index in range(rows):
        parts = []
        while sum(len(p) for p in parts) < 6 * length:  # ~4-5 characters a token: comfortably over L
            parts.append(records[cursor % len(records)]["output"])
            cursor += 1
        out.append({"instruction": records[index]["instruction"], "input": "", "output": "\n\n".join(parts)})
    path = folder / f"long_{rows}x{length}.json"
    path.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return path


def _uptime() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def sequence_length_curve(lengths=LENGTHS, sides=LENGTH_SIDES, *, steps: int = 2, budget: int = 2048,
                          trl_max_length: int = 4096, out: Path = ROOT / "bench" / "results",
                          verbose: bool = False, budget_lengths=None, one_step_from: int | None = None) -> list[dict]:
    """Run every (side, length) point in a fresh process; write the PNG and the table; return the points.

    `budget_lengths`: the lengths the budget side runs at (default: all); `one_step_from`: rows of this
    many tokens or more run one step instead of `steps` (its peak is then the first step's, before
    AdamW allocates its moments; the table says how many steps each point ran)."""
    from instructune.cache import cache_dir

    spec, folder = train_bench.model_specs([train_bench.WORKLOADS["A"]])["smollm2"]
    points, table = [], ""
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        cache.mkdir()
        (cache / "gguf").symlink_to(cache_dir() / "gguf", target_is_directory=True)
        for length in lengths:
            point_steps = 1 if one_step_from and length >= one_step_from else steps
            data = long_rows(point_steps, length, tmp)
            for side in sides:
                if side == "trl" and length > trl_max_length:
                    continue
                if side == "instructune-budget" and budget_lengths and length not in budget_lengths:
                    continue
                ours = {"max_tokens_per_forward": budget} if side == "instructune-budget" else {}
                job = {"side": "instructune" if side.startswith("instructune") else side,
                       "model_spec": spec, "model_folder": folder, "template": None, "template_text": None,
                       "added_tokens": None, "lora": None, "data": str(data), "max_steps": point_steps,
                       "micro_batch": None, "trl_same_targets": True, "ours_config": ours,
                       "settings": {"batch_size": 1, "max_length": length, "epochs": 1, "lr": 1e-5},
                       "output_dir": str(tmp / f"out-{side}-{length}")}
                load = _uptime()
                print(f"L={length} {side} ({load}) ...", flush=True)
                result = train_bench.run_child(job, {**os.environ, "INSTRUCTUNE_CACHE": str(cache)}, verbose)
                point = {"side": side, "length": length, "tokens": result["tokens"], "loop_s": result["loop_s"],
                         "tokens_per_s": result["tokens"] / result["loop_s"], "peak_rss_gb": result["peak_rss_gb"],
                         "token_loss": result["token_loss"], "load": load, "steps": point_steps}
                print(f"    {point['tokens_per_s']:.1f} tokens/s, peak RSS {point['peak_rss_gb']:.2f} GB", flush=True)
                points.append(point)
                table = write_length_results(points, budget, out)  # after every point: a long run keeps what it has
    print(table)
    return points


def write_length_results(points: list[dict], budget: int, out: Path) -> str:
    """`<out>/scale_length.{md,json,png}` from the points so far; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = length_table(points, budget)
    (out / "scale_length.md").write_text(table + "\n", encoding="utf-8")
    (out / "scale_length.json").write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
    plot_length_curve(points, out / "scale_length.png", budget)
    return table


def budget_speed_ratio(budgets=(512, 256), *, pairs: int = 4, out: Path = ROOT / "bench" / "results") -> dict:
    """Workload A's forward+backward time with a token budget against none, measured in one process.

    The same steps' rows (workload A: 48 Alpaca rows, 4 a step, max length 512) run alternately without
    a budget and with each budget, step after step, so a load that drifts over the run (a shared
    machine) weighs on both alike; the figure is the median over the steps of (time with / time without).
    The optimizer step is left out (it does not depend on the split). Written to `<out>/budget_speed.json`.
    """
    import statistics

    from rich.console import Console

    from instructune.train.config import TrainConfig
    from instructune.train.loop import _collate, accumulate_gradients, setup_run
    from instructune.train.step_plan import step_denominator

    spec, _ = train_bench.model_specs([train_bench.WORKLOADS["A"]])["smollm2"]
    with tempfile.TemporaryDirectory(prefix="scale-speed-") as tmp:
        data = train_bench.write_rows("alpaca", 48, Path(tmp))
        config = TrainConfig(model=spec, data=str(data), eval_fraction=0.0, max_length=512, truncation="keep_start",
                             batch_size=4, epochs=1, lr=1e-5, output_dir=str(Path(tmp) / "out"), overwrite=True,
                             max_tokens_per_forward=0)
        run = setup_run(config, name="bench", console=Console(quiet=True))
        times: dict[str, list[float]] = {str(b): [] for b in (None, *budgets)}
        for step in range(min(pairs + 1, run.plan.total_steps())):
            order = (None, *budgets) if step % 2 else (*budgets[::-1], None)
            for budget in order:
                run.plan.tokens_per_forward = budget
                _, groups, recompute = run.plan.step_forwards(step)
                batches = [_collate(run, group) for group in groups]
                start = time.perf_counter()
                accumulate_gradients(run, batches, step_denominator(batches, "token"), recompute)
                elapsed = time.perf_counter() - start
                run.model.zero_grad(set_to_none=True)
                if step:  # the first step warms up (page faults, allocator): not counted
                    times[str(budget)].append(elapsed)
    result = {"load": _uptime(), "pairs": len(times["None"]), "seconds": times,
              "median_ratio": {str(b): statistics.median(w / n for w, n in zip(times[str(b)], times["None"]))
                               for b in budgets}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget_speed.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result["median_ratio"]), result["load"])
    return result


def length_table(points: list[dict], budget: int) -> str:
    """The points as a Markdown table, one line per (length, side), with the load each was measured under."""
    lines = ["| row tokens | side | steps | tokens/s | peak RSS GB | RSS vs TRL | loop s | load when started |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    trl = {p["length"]: p["peak_rss_gb"] for p in points if p["side"] == "trl"}
    for p in sorted(points, key=lambda p: (p["length"], p["side"])):
        name = f"instructune, budget {budget}" if p["side"] == "instructune-budget" else p["side"]
        ratio = f"{p['peak_rss_gb'] / trl[p['length']]:.2f}x" if p["length"] in trl and p["side"] != "trl" else ""
        lines.append(f"| {p['length']} | {name} | {p.get('steps', '')} | {p['tokens_per_s']:.1f} | {p['peak_rss_gb']:.2f} | {ratio} | "
                     f"{p['loop_s']:.1f} | {p['load']} |")
    return "\n".join(lines)


def plot_length_curve(points: list[dict], path: Path, budget: int) -> None:
    """Tokens/s and peak RSS against row length, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for side in dict.fromkeys(p["side"] for p in points):
        mine = sorted((p for p in points if p["side"] == side), key=lambda p: p["length"])
        label = f"instructune, budget {budget}" if side == "instructune-budget" else side
        xs = [p["length"] for p in mine]
        speed.plot(xs, [p["tokens_per_s"] for p in mine], marker="o", label=label)
        memory.plot(xs, [p["peak_rss_gb"] for p in mine], marker="o", label=label)
    for axis, title in ((speed, "training tokens/s"), (memory, "peak RSS (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per row (one row a step)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle("SmolLM2-135M, fp32, CPU: sequence length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- data size (`--part data`) -------------------------------------------------------------------------

ALPACA = ROOT / "tests" / "fixtures" / "data" / "alpaca_en_demo.json"
DATA_SIZES = (10_000, 100_000, 1_000_000)


def write_varied_rows(source: Path, n: int, ours: Path, trl: Path | None) -> None:
    """Write `n` rows varied from `source`'s, one at a time: Alpaca JSONL for us, and (when `trl` is
    given) the same rows in TRL's conversational prompt-completion format."""
    rows = json.loads(source.read_text(encoding="utf-8"))
    with open(ours, "w", encoding="utf-8") as mine, open(trl or os.devnull, "w", encoding="utf-8") as theirs:
        for k in range(n):
            row = dict(rows[k % len(rows)])
            if (k // len(rows)) % 2:
                row["instruction"] = f"{row['instruction']} (variant {k})"
            else:
                row["instruction"] = f"Task {k}: {row['instruction']}"
            mine.write(json.dumps(row, ensure_ascii=False) + "\n")
            if trl:
                prompt = "\n\n".join(p for p in (row["instruction"], row.get("input")) if p)
                theirs.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                         "completion": [{"role": "assistant", "content": row["output"]}]},
                                        ensure_ascii=False) + "\n")


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child, in MB (Linux: KiB units)."""
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def _cpu_seconds() -> float:
    t = os.times()  # this process and its finished (reaped) worker processes
    return t.user + t.system + t.children_user + t.children_system


def measure_data_point(side: str, path: Path, cache: Path | None, num_proc: int | None) -> dict:
    """One point, in this (fresh) process: prepare `path` and return seconds, CPU seconds, rows and peak RSS."""
    import warnings

    warnings.filterwarnings("ignore")
    from prepare_bench import load_tokenizer, trl_prepare

    tokenizer, _ = load_tokenizer()
    if side == "ours":
        from instructune.data.prepare import prepare_dataset

        start, cpu = time.perf_counter(), _cpu_seconds()
        prepared = prepare_dataset(path, tokenizer, cache_dir=cache, num_proc=num_proc)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        rows, kept, from_cache = prepared.report.rows_read, prepared.report.rows_kept, prepared.from_cache
    else:
        import datasets

        datasets.disable_caching()
        datasets.disable_progress_bars()
        dataset = datasets.load_from_disk(str(path))  # memory-mapped Arrow, built in another process
        start, cpu = time.perf_counter(), _cpu_seconds()
        prepared = trl_prepare(dataset, tokenizer, num_proc)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        rows = kept = len(prepared)
        from_cache = False
    main_mb, worker_mb = _peak_rss_mb()
    return {"side": side, "rows": rows, "kept": kept, "seconds": seconds, "cpu_s": cpu, "rows_per_s": rows / seconds,
            "rss_mb": main_mb, "worker_rss_mb": worker_mb, "from_cache": from_cache}


def build_trl_dataset(jsonl: Path, folder: Path) -> None:
    """TRL's input as an Arrow dataset on disk (so that the timed process maps it instead of parsing JSON)."""
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_json(str(jsonl), cache_dir=str(folder.parent / "hf-cache"))
    dataset.save_to_disk(str(folder))


def _data_point_in_fresh_process(*args: str) -> dict:
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--data-point", *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def data_size_curve(sizes=DATA_SIZES, *, trl_max_rows: int = 100_000, trl_num_procs=(None, 2),
                    work: Path, source: Path = ALPACA, warm_max_rows: int = 100_000) -> list[dict]:
    """Measure every point of the data-size curve; returns one record per point.

    For each size: the rows are written (Alpaca JSONL for us; prompt-completion JSONL made into an Arrow
    dataset on disk for TRL, outside the timing); instructune's `prepare_dataset` with a fresh cache
    (cold: streamed, sharded, parallel over the cores; and up to `warm_max_rows` again with that cache:
    a second run), then TRL's `_prepare_dataset` with `dataset_num_proc` None (its default) and 2, each
    point in a fresh process. TRL runs up to `trl_max_rows`; a larger size gets an estimate at TRL's
    rows/s of the largest size run (marked `estimated`), without RSS.
    """
    points = []
    for n in sizes:
        ours, trl = work / f"rows_{n}.jsonl", work / f"rows_{n}_trl.jsonl"
        run_trl = n <= trl_max_rows
        print(f"[{n:,} rows] writing the data ...", flush=True)
        write_varied_rows(source, n, ours, trl if run_trl else None)
        cache = work / f"cache_{n}"
        for variant in ("cold", "warm") if n <= warm_max_rows else ("cold",):
            point = _data_point_in_fresh_process("ours", str(ours), str(cache), "auto")
            point.update(size=n, variant=f"instructune {variant} cache (np auto)")
            points.append(point)
            _print_data_point(point)
        if run_trl:
            arrow = work / f"trl_{n}"
            build_trl_dataset(trl, arrow)
            for num_proc in trl_num_procs:
                point = _data_point_in_fresh_process("trl", str(arrow), "-", str(num_proc or "none"))
                point.update(size=n, variant=f"trl _prepare_dataset np={num_proc}")
                points.append(point)
                _print_data_point(point)
        else:
            for num_proc in trl_num_procs:
                measured = [p for p in points if p["variant"] == f"trl _prepare_dataset np={num_proc}"]
                if measured:
                    last = measured[-1]
                    points.append({"side": "trl", "size": n, "rows": n, "variant": last["variant"],
                                   "seconds": n / last["rows_per_s"], "rows_per_s": last["rows_per_s"],
                                   "cpu_s": last["cpu_s"] * n / last["size"], "rss_mb": None,
                                   "worker_rss_mb": None, "estimated": f"from {last['size']:,} rows"})
                    _print_data_point(points[-1])
        for path in (ours, trl):
            path.unlink(missing_ok=True)
    return points


def _print_data_point(p: dict) -> None:
    rss = "      -" if p.get("rss_mb") is None else f"{p['rss_mb']:7.0f}"
    worker = "      -" if not p.get("worker_rss_mb") else f"{p['worker_rss_mb']:7.0f}"
    note = f"  (estimated {p['estimated']})" if p.get("estimated") else ""
    print(f"{p['size']:>9,} {p['variant']:<38} {p['seconds']:9.1f} {p['rows_per_s']:8.0f} {p['cpu_s']:8.1f} "
          f"{rss} {worker}{note}", flush=True)


def data_size_table(points: list[dict]) -> str:
    """The points as a Markdown table, with instructune's cold-cache rows/s over TRL's per size."""
    lines = ["| rows | variant | seconds | rows/s | CPU s | peak RSS MB (main) | peak RSS MB (largest worker) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        rss = "-" if p.get("rss_mb") is None else f"{p['rss_mb']:.0f}"
        worker = "-" if not p.get("worker_rss_mb") else f"{p['worker_rss_mb']:.0f}"
        variant = p["variant"] + (f" (estimated {p['estimated']})" if p.get("estimated") else "")
        lines.append(f"| {p['size']:,} | {variant} | {p['seconds']:.1f} | {p['rows_per_s']:,.0f} | {p['cpu_s']:.1f} "
                     f"| {rss} | {worker} |")
    lines.append("")
    for size in sorted({p["size"] for p in points}):
        ours = [p for p in points if p["size"] == size and "cold" in p["variant"]]
        for t in (p for p in points if p["size"] == size and p["side"] == "trl"):
            ratio, cpu = ours[0]["rows_per_s"] / t["rows_per_s"], t["cpu_s"] / ours[0]["cpu_s"]
            lines.append(f"- {size:,} rows: instructune cold / {t['variant']}"
                         f"{' (estimated)' if t.get('estimated') else ''}: {ratio:.2f}x rows/s, "
                         f"{cpu:.2f}x on CPU seconds")
    return "\n".join(lines)


def plot_data_size(points: list[dict], png: Path) -> None:
    """Two panels over the row count (log x): rows/s (dotted: estimated), and peak RSS of the main process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in dict.fromkeys(p["variant"] for p in points):
        mine = [p for p in points if p["variant"] == variant]
        measured = [p for p in mine if not p.get("estimated")]
        if not measured:
            continue
        style = "-o" if variant.startswith("instructune") else "--s"
        line, = speed.plot([p["size"] for p in measured], [p["rows_per_s"] for p in measured], style, label=variant)
        estimated = [p for p in mine if p.get("estimated")]
        if estimated:
            speed.plot([measured[-1]["size"], estimated[-1]["size"]],
                       [measured[-1]["rows_per_s"], estimated[-1]["rows_per_s"]], ":", color=line.get_color())
        memory.plot([p["size"] for p in measured], [p["rss_mb"] for p in measured], style, label=variant,
                    color=line.get_color())
    for axis, title in ((speed, "rows/s, log scale (dotted: TRL estimated)"),
                        (memory, "peak RSS, main process (MB)")):
        axis.set_xscale("log")
        axis.set_xlabel("rows")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    speed.set_yscale("log")
    memory.set_ylim(bottom=0)
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_data_part(args) -> None:
    """`--part data`: the curve, then `<out>/scale_data.{png,md,json}`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"uptime before: {_uptime()}", flush=True)
    print(f"{'rows':>9} {'variant':<38} {'seconds':>9} {'rows/s':>8} {'CPU s':>8} {'RSS MB':>7} {'worker':>7}")
    with tempfile.TemporaryDirectory(prefix="scale-data-", dir=args.work) as work:
        points = data_size_curve(args.sizes, trl_max_rows=args.trl_max_rows, work=Path(work),
                                 warm_max_rows=args.warm_max_rows)
    print(f"uptime after: {_uptime()}", flush=True)
    (out / "scale_data.json").write_text(json.dumps(points, indent=1))
    table = data_size_table(points)
    (out / "scale_data.md").write_text(table + "\n")
    plot_data_size(points, out / "scale_data.png")
    print("\n" + table + f"\n\nwritten: {out / 'scale_data.png'}, {out / 'scale_data.md'}, {out / 'scale_data.json'}")


def data_point_main(argv: list[str]) -> int:
    """`--data-point SIDE PATH CACHE NUM_PROC`: one point of the data-size curve, printed as JSON."""
    side, path, cache, num_proc = argv[:4]
    procs = None if num_proc in ("auto", "none") else int(num_proc)
    print(json.dumps(measure_data_point(side, Path(path), None if cache == "-" else Path(cache), procs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--data-point"]:  # a child process measuring one point of the data-size curve
        return data_point_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("length", "data", "all"), default="all",
                        help="which curves: length (sequence length), data (data size), all")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="row lengths in tokens")
    parser.add_argument("--sides", default=",".join(LENGTH_SIDES), help=f"from {', '.join(LENGTH_SIDES)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (rows) per point (default 2)")
    parser.add_argument("--budget", type=int, default=2048, help="max_tokens_per_forward of instructune-budget")
    parser.add_argument("--trl-max-length", type=int, default=4096, help="longest row TRL is run on")
    parser.add_argument("--budget-lengths", default="", help="lengths the budget side runs at (default: all)")
    parser.add_argument("--one-step-from", type=int, default=None,
                        help="rows of this many tokens or more run one step (long rows take minutes a step)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the PNG and tables go")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--budget-speed-pairs", type=int, default=0,
                        help="length part: instead of the curve, time workload A with budgets 512 and 256 "
                             "against none, alternately, over this many steps (budget_speed_ratio)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DATA_SIZES), help="data part: row counts")
    parser.add_argument("--trl-max-rows", type=int, default=100_000,
                        help="data part: the largest size TRL runs; larger sizes are estimated from it")
    parser.add_argument("--warm-max-rows", type=int, default=100_000,
                        help="data part: the largest size also timed with a warm cache (a second run)")
    parser.add_argument("--work", default=None, help="data part: folder for the generated rows and caches")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.part in ("length", "all") and args.budget_speed_pairs:
        budget_speed_ratio(pairs=args.budget_speed_pairs, out=args.out)
    elif args.part in ("length", "all"):
        sequence_length_curve([int(n) for n in args.lengths.split(",")],
                              [s.strip() for s in args.sides.split(",") if s.strip()], steps=args.steps,
                              budget=args.budget, trl_max_length=args.trl_max_length, out=args.out,
                              verbose=args.verbose, one_step_from=args.one_step_from,
                              budget_lengths=[int(n) for n in args.budget_lengths.split(",") if n.strip()])
    if args.part in ("data", "all"):
        run_data_part(args)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
