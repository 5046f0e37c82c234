"""A live `instructune serve` app on 127.0.0.1 for the server and chat-page tests.

The model is a tiny random Llama that memorised two answers (so answers are known exactly), with the
in-process ChatML tokenizer; uvicorn runs it in a background thread on a port the OS picked.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from functools import cache

from instructune.data.conversation import Conversation, Message
from instructune.testing import make_tiny_model, make_tiny_tokenizer, memorise
from instructune.use.loading import LoadedModel

PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Which is the largest ocean?", "The Pacific Ocean is the largest ocean.")]
MODEL_NAME = "tiny-chat"
API_KEY = "test-key"


@cache
def memorised_model() -> LoadedModel:
    """The tiny model that answers PAIRS' questions with PAIRS' answers, with its template and stop ids
    (trained once per test session: the server and chat-page tests share it)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), hidden_size=64)
    memorise(model, tokenizer, [Conversation([Message("user", q), Message("assistant", a)]) for q, a in PAIRS])
    return LoadedModel.wrap(model, tokenizer, tokenizer.chat_template, spec=MODEL_NAME)


@dataclass
class LiveServer:
    """A running server: its base URL and the app (whose `state.service` holds the queue)."""

    url: str
    app: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(loaded: LoadedModel, *, graceful_s: int = 2, **options) -> LiveServer:
    """Serve `loaded` on 127.0.0.1 in a background thread; returns once it answers. `graceful_s`: how long a
    stopping server waits for the answers under way."""
    from instructune.use.server import create_app, server_for

    app = create_app(loaded, model_name=MODEL_NAME, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = server_for(app, log_level="warning", timeout_graceful_shutdown=graceful_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)
