"""GGUF export against the Hugging Face model: do llama.cpp's greedy answers match, and do they stop?

    .venv/bin/python bench/gguf_agreement.py runs/default/checkpoint-57      # a trained checkpoint
    .venv/bin/python bench/gguf_agreement.py smollm2-135m-instruct --limit 10 # the base model, 10 questions

The checkpoint is exported once per type (f32, f16, q8_0) with `instructune.model.export`, loaded by
llama.cpp (llama-cpp-python) and asked the 62 held-out questions of the packaged set (chat template,
generation prompt). Both sides decode greedily (argmax of their own logits, no sampler) up to
`--max-new-tokens`; the HF side is instructune's `generate_ids` one prompt at a time (no padding), in
fp32. Per type it prints:

- prompt ids: llama.cpp tokenizes the rendered prompt text into the same ids as the HF tokenizer;
- token-identical: the same new token ids, the stop included;
- same answer: the same decoded answer text (special tokens left out, whitespace stripped);
- stopped at EOT: llama.cpp ended at the end-of-turn token (not at the token limit), where HF did.

f32 runs llama.cpp with an fp32 attention cache, so it differs from PyTorch only in summation order;
f16 and q8_0 run with llama.cpp's default (fp16) cache, as a user gets them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _questions(limit: int | None) -> list[str]:
    from instructune.study.default_job import dataset_file

    lines = dataset_file("heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()][:limit]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "(uptime not available)"


def _row(row: tuple, n: int) -> str:
    kind, mb, export_s, run_s, prompt_ok, tokens_ok, answer_ok, stop_ok, hf_stops = row
    return (f"{kind:6} {mb:6.0f} {export_s:8.1f} {run_s:11.1f} {prompt_ok:4}/{n} {100 * prompt_ok / n:3.0f}% "
            f"{tokens_ok:8}/{n} {100 * tokens_ok / n:3.0f}% {answer_ok:4}/{n} {100 * answer_ok / n:3.0f}% "
            f"{stop_ok:7}/{hf_stops}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder, LoRA adapter folder, model folder or alias")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--limit", type=int, help="only the first N held-out questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--keep", help="write the GGUF files into this folder (default: a temporary one)")
    parser.add_argument("--details", help="write each question's answers on both sides to this JSONL file")
    args = parser.parse_args()

    import torch

    from instructune.data.conversation import Conversation, Message
    from instructune.model.export import export_gguf
    from instructune.model.export.llama_cpp_run import greedy_ids, open_gguf
    from instructune.use.generation import decode_answer, encode_prompts, generate_ids
    from instructune.use.loading import load_for_inference

    torch.set_num_threads(args.threads)
    print(f"uptime before: {_uptime()}", flush=True)
    loaded = load_for_inference(args.checkpoint, device="cpu", dtype=torch.float32)
    tokenizer, eot = loaded.tokenizer, loaded.stop_token_ids
    questions = _questions(args.limit)
    prompts = encode_prompts(tokenizer, loaded.template, [Conversation([Message("user", q)]) for q in questions])
    texts = [tokenizer.decode(p) for p in prompts]  # the rendered prompt, special tokens written out
    started = time.perf_counter()
    hf = []
    for prompt in prompts:  # one at a time: no padding, the plain fp32 forward
        new = generate_ids(loaded.model, [prompt], stop_token_ids=eot, pad_token_id=loaded.pad_token_id,
                           max_new_tokens=args.max_new_tokens)[0]
        hf.append((new, len(new) < args.max_new_tokens))  # cut before its stop token, when it stopped
    print(f"HF greedy answers: {time.perf_counter() - started:.0f} s for {len(prompts)} questions", flush=True)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gguf-agreement-"))
    rows, details = [], []
    for kind in args.types:
        started = time.perf_counter()
        out = export_gguf(args.checkpoint, folder / f"model-{kind}.gguf", kind=kind, overwrite=True)  # as the CLI
        export_s = time.perf_counter() - started
        same_prompt = same_tokens = same_answer = stopped = 0
        started = time.perf_counter()
        with open_gguf(out, n_ctx=512, threads=args.threads, f32_cache=kind == "f32") as llm:
            for question, prompt, text, (hf_ids, hf_stopped) in zip(questions, prompts, texts, hf):
                same_prompt += llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
                ids, stop = greedy_ids(llm, prompt, max_new_tokens=args.max_new_tokens)
                at_eot = stop is not None and stop in eot
                same_tokens += ids == hf_ids and at_eot == hf_stopped
                same_answer += decode_answer(tokenizer, ids) == decode_answer(tokenizer, hf_ids)
                stopped += at_eot and hf_stopped
                details.append({"type": kind, "question": question, "hf": decode_answer(tokenizer, hf_ids),
                                "llama_cpp": decode_answer(tokenizer, ids), "hf_stopped": hf_stopped,
                                "llama_cpp_stop": stop})
        rows.append((kind, out.stat().st_size / 1e6, export_s, time.perf_counter() - started,
                     same_prompt, same_tokens, same_answer, stopped, sum(hf_stopped for _, hf_stopped in hf)))
        print(f"{kind} done: {_row(rows[-1], len(questions))}", flush=True)  # a long run shows each type at once
    print(f"\n{args.checkpoint}: {len(questions)} held-out questions, greedy, at most {args.max_new_tokens} new "
          f"tokens, {args.threads} thread(s)")
    print(f"{'type':6} {'MB':>6} {'export s':>8} {'llama.cpp s':>11} {'prompt ids':>11} {'token-identical':>16} "
          f"{'same answer':>12} {'stopped at EOT (of HF stops)':>15}")
    for row in rows:
        print(_row(row, len(questions)))
    print(f"uptime after: {_uptime()}")
    if args.details:
        with open(args.details, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
