"""Greedy generation: instructune's KV-cache loop (`generate_ids`) against `model.generate`, same tokens.

    .venv/bin/python bench/generation_bench.py                 # tiny test model and SmolLM2-135M-Instruct
    .venv/bin/python bench/generation_bench.py --models tiny --repeats 10

Both sides get the same left-padded batch (8 held-out questions of the packaged set, chat template,
generation prompt), decode greedily up to 32 new tokens, stop at the template's end-of-turn ids,
and must return the same tokens. Timings alternate the two sides; the best and the median are shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _questions(n: int) -> list[str]:
    from instructune.study.default_job import dataset_file

    lines = dataset_file("heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()][:n]


def _load(name: str):
    from instructune.use.loading import LoadedModel

    if name == "tiny":
        from instructune.testing import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        return LoadedModel.wrap(make_tiny_model(len(tokenizer)).eval(), tokenizer, tokenizer.chat_template)
    from instructune.model.load import DEFAULT_MODEL
    from instructune.use.loading import load_for_inference

    return load_for_inference(DEFAULT_MODEL if name == "smollm2" else name)


def _with_generate(loaded, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    from instructune.use.generation import left_pad

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=loaded.stop_token_ids,
                              pad_token_id=loaded.pad_token_id)
    ids, mask = left_pad(prompts, loaded.pad_token_id)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = out[:, ids.shape[1]:].tolist()
    return [next((r[:k] for k, t in enumerate(r) if t in loaded.stop_token_ids), r) for r in rows]


def bench(name: str, *, batch: int, max_new_tokens: int, repeats: int) -> None:
    """Time both sides on one model and print the figures."""
    from instructune.data.conversation import Conversation, Message
    from instructune.use.generation import encode_prompts, generate_ids

    loaded = _load(name)
    convs = [Conversation([Message("user", q)]) for q in _questions(batch)]
    prompts = encode_prompts(loaded.tokenizer, loaded.template, convs)

    def ours():
        return generate_ids(loaded.model, prompts, stop_token_ids=loaded.stop_token_ids,
                            pad_token_id=loaded.pad_token_id, max_new_tokens=max_new_tokens, batch_size=batch)

    def theirs():
        # generate_ids sorts by length; sort here too so that both see the same batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows = _with_generate(loaded, [prompts[i] for i in order], max_new_tokens)
        return [rows[order.index(i)] for i in range(len(prompts))]

    a, b = ours(), theirs()  # warm-up, and the check that both give the same tokens
    same = a == b
    times: dict[str, list[float]] = {"kv loop": [], "model.generate": []}
    for _ in range(repeats):
        for label, fn in (("kv loop", ours), ("model.generate", theirs)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    new = sum(len(r) for r in a)
    print(f"{name}: batch {batch}, {new} new tokens in all (max {max_new_tokens}/row), "
          f"same tokens: {same}, threads {torch.get_num_threads()}")
    for label, values in times.items():
        print(f"  {label:15s} best {min(values) * 1e3:8.1f} ms   median {statistics.median(values) * 1e3:8.1f} ms")


def main() -> None:
    """Parse the flags and bench each model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in args.models:
        bench(name, batch=args.batch, max_new_tokens=args.max_new_tokens, repeats=args.repeats)


if __name__ == "__main__":
    main()
