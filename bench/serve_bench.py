"""`instructune serve` under load: 16 concurrent requests against the same 16 sent one after another.

    .venv/bin/python bench/serve_bench.py                       # SmolLM2-135M-Instruct (the packaged GGUF)
    .venv/bin/python bench/serve_bench.py --model tiny --requests 16 --max-tokens 32
    .venv/bin/python bench/serve_bench.py --threads 1                # a busy shared CPU

A live server on 127.0.0.1 (uvicorn in a background thread), the official `openai` client. Each request
is one held-out question of the packaged set, greedy, `max_tokens` new tokens at most. Serial: one
request at a time (each a batch of one). Concurrent: all at once from 16 threads; the server's queue
batches those that wait together. Both runs must give the same answers (greedy); the ratio is
serial time / concurrent time. The server's batch sizes are printed, so the batching is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _questions(n: int) -> list[str]:
    from instructune.study.default_job import dataset_file

    lines = dataset_file("heldout.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["instruction"] for line in lines if line.strip()]
    return [questions[k % len(questions)] for k in range(n)]


def _load(name: str, device: str | None):
    from instructune.use.loading import LoadedModel, load_for_inference

    if name == "tiny":
        from instructune.testing import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        return LoadedModel.wrap(make_tiny_model(len(tokenizer)).eval(), tokenizer, tokenizer.chat_template)
    from instructune.model.load import DEFAULT_MODEL

    return load_for_inference(DEFAULT_MODEL if name == "smollm2" else name, device=device)


def _start(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or any model spec")
    parser.add_argument("--device", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's; 1 on a busy shared CPU, where OpenMP threads wait on "
                             "each other's barriers: see instructune/train/threads.py)")
    args = parser.parse_args()

    import openai
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from instructune.use.server import create_app

    loaded = _load(args.model, args.device)
    app = create_app(loaded, model_name="bench", batch_size=args.batch_size)
    server, thread, port = _start(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    questions = _questions(args.requests)

    def ask(question: str) -> tuple[str, int]:
        reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=args.max_tokens)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    print(f"loaded {args.model}; warming up", flush=True)
    ask(questions[0])  # warm-up: first-call costs out of both timings
    queue = app.state.service.queue
    start = time.perf_counter()
    serial = [ask(q) for q in questions]
    serial_s = time.perf_counter() - start
    print(f"serial done: {serial_s:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    before = len(queue.batches)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        concurrent = list(pool.map(ask, questions))
    concurrent_s = time.perf_counter() - start
    batches = queue.batches[before:]
    server.should_exit = True
    thread.join(timeout=30)

    same = sum(a[0] == b[0] for a, b in zip(serial, concurrent))
    tokens = sum(n for _, n in serial)
    print(f"model {args.model} on {loaded.device}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f} (1-min), python {sys.version.split()[0]}")
    print(f"{len(questions)} requests, greedy, max_tokens {args.max_tokens}: {tokens} answer tokens in all")
    print(f"serial:     {serial_s:7.2f} s  ({tokens / serial_s:7.1f} tokens/s)")
    print(f"concurrent: {concurrent_s:7.2f} s  ({tokens / concurrent_s:7.1f} tokens/s), batches {batches}")
    print(f"speed-up (serial / concurrent): {serial_s / concurrent_s:.2f}x; identical answers: {same}/{len(questions)}")


if __name__ == "__main__":
    main()
