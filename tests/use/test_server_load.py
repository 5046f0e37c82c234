"""`instructune serve` under load and faults: a bounded queue (503 + Retry-After, never a hang), a request time
limit, clients that go away mid-stream (their places freed at the next token, the others' answers intact),
a drain on SIGTERM, `/health` reporting the queue, and memory that stays flat over 1,000 requests.

The worker's decoding is held at a gate (`StepGate`) where a test needs requests to be waiting or running
at a known moment: every ordering below is made by events, none by sleeping."""

from __future__ import annotations

import gc
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

import instructune.use.generation_queue as generation_queue
from instructune.data.conversation import Conversation, Message
from instructune.use.generation import encode_prompts
from server_fixtures import MODEL_NAME, PAIRS, memorised_model, start_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

torch.set_num_threads(1)  # the tiny model gains nothing from a second thread on a shared machine
WAIT_S = 60  # a safety net for a broken build: every wait below ends by an event long before


class StepGate:
    """Holds the worker before each batch's first token until `release()`; `started` is set once it waits.

    `after_first` (optional) runs in the worker between a batch's first and second token."""

    def __init__(self):
        self.started = threading.Event()
        self.opened = threading.Event()
        self.after_first = None

    def release(self) -> None:
        self.opened.set()

    def install(self, monkeypatch) -> None:
        real = generation_queue.decode_steps

        def held_steps(*args, **kwargs):
            self.started.set()
            assert self.opened.wait(WAIT_S), "the gate was never opened"
            steps = real(*args, **kwargs)
            try:
                yield next(steps)
                if self.after_first is not None:
                    self.after_first()
                yield from steps
            except StopIteration:
                return
            finally:
                steps.close()

        monkeypatch.setattr(generation_queue, "decode_steps", held_steps)


@pytest.fixture
def gate(monkeypatch) -> StepGate:
    gate = StepGate()
    gate.install(monkeypatch)
    yield gate
    gate.release()  # whatever a failed test left waiting


@pytest.fixture
def serve():
    servers = []

    def start(**options):
        server = start_server(memorised_model(), **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def post(url: str, question: str, *, stream: bool = False, max_tokens: int = 64,
         timeout: float = WAIT_S) -> tuple[int, dict, dict | list]:
    """(status, headers, JSON body or the streamed chunks) of one chat completion."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    if stream and response.status == 200:
        chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        return response.status, dict(response.getheaders()), chunks
    return response.status, dict(response.getheaders()), json.loads(raw)


def health(url: str) -> dict:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    connection.request("GET", "/health")
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def wait_for(condition, what: str) -> None:
    """Until `condition()` holds; it watches the server's own state, which the requests change."""
    done = threading.Event()
    for _ in range(WAIT_S * 200):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError(f"never: {what}")


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_beyond_the_queue_bound_requests_get_503_with_retry_after_and_nothing_hangs(serve, gate):
    live = serve(batch_size=1, max_queue=2)
    queue = live.app.state.service.queue
    pool = ThreadPoolExecutor(3)
    running = pool.submit(post, live.url, PAIRS[0][0])
    assert gate.started.wait(WAIT_S)  # the first request runs (held at the gate)
    waiting = [pool.submit(post, live.url, PAIRS[i % 2][0]) for i in range(2)]
    wait_for(lambda: queue.stats()["waiting"] == 2, "two requests waiting")
    assert health(live.url) | {"model": None} == {"status": "ok", "queue": 2, "running": 1, "max_queue": 2,
                                                 "model": None, "api_key_required": False}
    for _ in range(5):  # the queue is full: refused at once, with when to come back
        status, headers, body = post(live.url, PAIRS[1][0])
        assert status == 503 and body["error"]["code"] == "server_busy", body
        assert int(headers["retry-after"]) >= 1 and "--max-queue" in body["error"]["message"]
    gate.release()
    answers = [f.result(timeout=WAIT_S) for f in [running, *waiting]]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[2]["choices"][0]["message"]["content"] for a in answers] == [PAIRS[0][1], PAIRS[0][1], PAIRS[1][1]]
    assert health(live.url)["queue"] == 0 and queue.stats()["running"] == 0
    pool.shutdown()


def test_a_request_over_its_time_limit_gets_504_and_gives_its_place_up(serve, gate):
    live = serve(batch_size=1, request_timeout=0.5)
    queue = live.app.state.service.queue
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, live.url, PAIRS[0][0])
        assert gate.started.wait(WAIT_S)
        status, _, body = post(live.url, PAIRS[1][0])  # waits behind the held one, and runs out of time
        assert status == 504 and body["error"]["code"] == "request_timeout"
        assert "--request-timeout" in body["error"]["message"]
        assert queue.stats()["waiting"] == 0  # its place is free again
        assert running.result(timeout=WAIT_S)[0] == 504  # the held one ran out of time too
    gate.release()  # the held batch finds its job cancelled at the first token, and the worker is free again
    wait_for(lambda: queue.stats()["running"] == 0, "the cancelled batch ended")
    assert health(live.url)["status"] == "ok"


def test_32_clients_half_of_them_leaving_mid_stream(serve, gate):
    """16 clients read the first piece of their stream and hang up; the other 16 get their whole answers.
    The ones that left stop at their batch's next token."""
    live = serve(batch_size=32, max_queue=64)
    queue = live.app.state.service.queue
    leaving_prompt = None
    freed: list[bool] = []

    def check_the_leavers_are_gone():
        # Between the batch's first and second token: once every leaver's connection is closed, its job must
        # be cancelled (so the next token finishes it) before decoding goes on.
        leavers = [job for job in queue.running if job.prompt == leaving_prompt]
        if leavers:
            wait_for(lambda: all(job.cancelled for job in leavers), "the server noticed the clients that left")
            freed.append(len(leavers))

    def leave_after_first_piece() -> int:
        parts = urlsplit(live.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PAIRS[1][0]}], "temperature": 0,
                "max_tokens": 64, "stream": True}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        while b'"content": ""' in (line := response.fp.readline()) or not line.startswith(b"data: {"):
            pass  # past the role chunk, to the first piece of the answer
        connection.sock.close()  # hang up mid-stream
        connection.close()
        return response.status

    loaded = memorised_model()
    leaving_prompt = encode_prompts(loaded.tokenizer, loaded.template, [Conversation([Message("user", PAIRS[1][0])])])[0]
    gate.after_first = check_the_leavers_are_gone
    with ThreadPoolExecutor(32) as pool:
        first = pool.submit(post, live.url, PAIRS[0][0], stream=True)  # runs alone, held at the gate
        assert gate.started.wait(WAIT_S)
        stayers = [pool.submit(post, live.url, PAIRS[0][0], stream=True) for _ in range(15)]
        leavers = [pool.submit(leave_after_first_piece) for _ in range(16)]
        wait_for(lambda: queue.stats()["waiting"] == 31, "31 requests waiting")
        assert health(live.url)["queue"] == 31
        gate.release()
        results = [f.result(timeout=WAIT_S) for f in [first, *stayers]]
        assert [f.result(timeout=WAIT_S) for f in leavers] == [200] * 16
    for status, _, chunks in results:
        assert status == 200 and text_of(chunks) == PAIRS[0][1]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "stop"
    assert freed == [16]  # the second batch held all 16 leavers, each cancelled before its next token
    wait_for(lambda: queue.stats() == {"waiting": 0, "running": 0, "max_waiting": 64}, "an idle queue")


def test_sigterm_refuses_what_waits_finishes_the_running_batch_and_exits(serve, gate):
    live = serve(batch_size=1, graceful_s=WAIT_S)
    queue = live.app.state.service.queue
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, live.url, PAIRS[1][0], stream=True)
        assert gate.started.wait(WAIT_S)
        waiting = pool.submit(post, live.url, PAIRS[0][0])
        wait_for(lambda: queue.stats()["waiting"] == 1, "one request waiting")
        live.server.handle_exit(15, None)  # what uvicorn's SIGTERM handler calls
        status, headers, body = waiting.result(timeout=WAIT_S)
        assert status == 503 and body["error"]["code"] == "server_shutting_down" and "retry-after" in headers
        assert not running.done()
        gate.release()
        status, _, chunks = running.result(timeout=WAIT_S)
    assert status == 200 and text_of(chunks) == PAIRS[1][1]  # the running batch was finished, whole
    live.thread.join(WAIT_S)
    assert not live.thread.is_alive()  # and the server is gone
    with pytest.raises(OSError):
        health(live.url)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the memory from /proc")
def test_a_thousand_sequential_requests_leave_the_memory_flat(serve):
    live = serve()
    parts = urlsplit(live.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)  # kept alive

    def ask(k: int) -> None:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PAIRS[k % 2][0]}], "temperature": 0,
                "max_tokens": 3, "stream": k % 3 == 0}
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read()

    for k in range(200):  # warm up: allocator pools, caches, lazily built tables
        ask(k)
    gc.collect()
    before = _rss_bytes()
    for k in range(1000):
        ask(k)
    gc.collect()
    grown = _rss_bytes() - before
    connection.close()
    print(f"RSS after 200 warm-up requests {before / 1e6:.1f} MB; after 1,000 more {grown / 1e6:+.2f} MB")
    assert grown < 8e6, f"the process grew by {grown / 1e6:.1f} MB over 1,000 requests"
