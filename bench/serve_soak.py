"""Soak test of `instructune serve`: N concurrent clients for M minutes against a live server.

Starts the real command (`python -m instructune serve MODEL`) on a free local port, then runs N client
threads that each send chat completions back to back (every third one streamed) for M minutes, and
reports requests/s, latency p50/p95/p99, the errors by kind (HTTP 503 busy, 504 timeout, other statuses,
connection errors) and the server's resident memory (RSS) over time. At the end it sends SIGTERM and
reports how long the drain took and the exit status.

    .venv/bin/python bench/serve_soak.py --clients 8 --minutes 2
    .venv/bin/python bench/serve_soak.py --clients 32 --minutes 1 --batch-size 4 --max-queue 8   # overload

`--json FILE` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Give one tip for sleeping well.", "Which is the largest ocean?", "Translate 'thank you' into Spanish."]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "instructune", "serve", "--model", args.model, "--model-name", "soak",
               "--port", str(port),
               "--batch-size", str(args.batch_size), "--request-timeout", str(args.request_timeout),
               "--max-new-tokens", str(args.max_tokens)]
    if args.max_queue is not None:
        command += ["--max-queue", str(args.max_queue)]
    # Its log goes to a file: a pipe nobody reads would fill up and stall the server.
    log = open(args.log, "w")  # noqa: SIM115 (open for the server's whole life)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {Path(args.log).read_text()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start within 10 minutes")


def client(port: int, index: int, stop_at: float, max_tokens: int, results: list, lock: threading.Lock) -> None:
    """Send requests back to back until `stop_at`; record (finished at, latency, outcome)."""
    sent = 0
    connection = None
    while time.monotonic() < stop_at:
        stream = sent % 3 == 0
        body = {"model": "soak", "messages": [{"role": "user", "content": QUESTIONS[(index + sent) % len(QUESTIONS)]}],
                "temperature": 0, "max_tokens": max_tokens, "stream": stream}
        started = time.monotonic()
        try:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            outcome = "ok" if response.status == 200 else f"http {response.status}"
            if response.status == 503:
                time.sleep(min(float(response.getheader("Retry-After") or 1), 5.0))  # what a polite client does
        except (OSError, http.client.HTTPException) as error:
            outcome = f"connection: {type(error).__name__}"
            connection = None
        with lock:
            results.append((time.monotonic(), time.monotonic() - started, outcome))
        sent += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=None)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the figures to this file as JSON")
    parser.add_argument("--log", default="serve_soak.log", help="where the server's own log goes")
    args = parser.parse_args()

    port = free_port()
    load_before = os.getloadavg()
    server = start_server(args, port)
    rss = [(0.0, rss_mb(server.pid))]
    results: list = []
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    threads = [threading.Thread(target=client, args=(port, i, stop_at, args.max_tokens, results, lock), daemon=True)
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(5)
        rss.append((time.monotonic() - started, rss_mb(server.pid)))
    load_during = os.getloadavg()
    elapsed = time.monotonic() - started

    drain_start = time.monotonic()
    server.send_signal(signal.SIGTERM)
    exit_status = server.wait(timeout=900)
    drain_s = time.monotonic() - drain_start

    latencies = [latency for _, latency, outcome in results if outcome == "ok"]
    outcomes = Counter(outcome for _, _, outcome in results)
    figures = {
        "model": args.model, "clients": args.clients, "minutes": args.minutes, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "max_queue": args.max_queue, "requests": len(results),
        "ok": outcomes.get("ok", 0), "requests_per_s": outcomes.get("ok", 0) / elapsed,
        "latency_s": {q: percentile(latencies, q) for q in (50, 95, 99)},
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "errors": {kind: n for kind, n in outcomes.items() if kind != "ok"},
        "rss_mb": [(round(t), round(mb, 1)) for t, mb in rss],
        "drain_s": drain_s, "exit_status": exit_status, "loadavg_before": load_before, "loadavg_during": load_during,
        "cpus": os.cpu_count(),
    }
    print(f"{args.clients} clients x {args.minutes:g} min, {args.model}, batch {args.batch_size}, "
          f"max_tokens {args.max_tokens}")
    print(f"requests: {len(results)} ({figures['ok']} answered), {figures['requests_per_s']:.2f} answered/s")
    print("latency of answered requests: p50 {:.2f} s, p95 {:.2f} s, p99 {:.2f} s".format(
        *(figures["latency_s"][q] for q in (50, 95, 99))))
    print(f"errors by kind: {figures['errors'] or 'none'}")
    first, peak, last = rss[1][1] if len(rss) > 1 else rss[0][1], max(mb for _, mb in rss), rss[-1][1]
    print(f"server RSS: {rss[0][1]:.0f} MB idle, {first:.0f} MB after 5 s, peak {peak:.0f} MB, {last:.0f} MB at the end")
    print("RSS over time (s, MB): " + ", ".join(f"{t:.0f}:{mb:.0f}" for t, mb in rss[:: max(1, len(rss) // 12)]))
    print(f"SIGTERM: drained and exited in {drain_s:.1f} s with status {exit_status}")
    print("load average (1, 5, 15 min): before {:.2f} {:.2f} {:.2f}, at the end {:.2f} {:.2f} {:.2f}; {} CPUs".format(
        *load_before, *load_during, os.cpu_count()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
