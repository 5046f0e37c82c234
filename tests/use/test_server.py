"""`instructune serve` answers the official `openai` client on a live 127.0.0.1 server: plain and streamed
answers equal to direct generation, 16 concurrent requests, seeds, stop strings, log-probabilities equal
to a direct forward pass, and clear 4xx refusals. Plus the pieces it is built from: the streamed text
(`AnswerText`) and the batching queue (`GenerationQueue`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from instructune.data.conversation import Conversation, Message
from instructune.errors import UserError
from instructune.testing import make_tiny_tokenizer
from instructune.use.answer_text import AnswerText
from instructune.use.generation import encode_prompts, generate_ids
from instructune.use.generation_queue import GenerationQueue, Job
from server_fixtures import API_KEY, MODEL_NAME, PAIRS, memorised_model, start_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

LOGPROB_TOLERANCE = 1e-4
"""A log-probability computed through the KV cache vs one full forward pass: the same fp32 sums in another
order. The logits (|z| < ~20) then differ by a few ulps (~1e-6 each) per layer; 1e-4 bounds that with room."""


@pytest.fixture(scope="module")
def loaded():
    return memorised_model()


@pytest.fixture(scope="module")
def live(loaded):
    server = start_server(loaded, api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def direct_ids(loaded, conversation: Conversation, **sampling) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) computed in-process, without the server."""
    prompt = encode_prompts(loaded.tokenizer, loaded.template, [conversation])[0]
    answer = generate_ids(loaded.model, [prompt], stop_token_ids=loaded.stop_token_ids,
                          pad_token_id=loaded.pad_token_id, **sampling)[0]
    return prompt, answer


def test_health_and_models(live, client):
    with urllib.request.urlopen(f"{live.url}/health") as response:  # no key needed
        assert json.load(response) == {"status": "ok", "model": MODEL_NAME, "api_key_required": True,
                                       "queue": 0, "running": 0, "max_queue": 32}  # 2 batches of 16 may wait
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).owned_by == "instructune"


def test_a_plain_answer_is_direct_generation(loaded, client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ask(PAIRS[0][0]), temperature=0)
    prompt, answer = direct_ids(loaded, Conversation([Message("user", PAIRS[0][0])]), max_new_tokens=64)
    choice = reply.choices[0]
    assert choice.message.content == PAIRS[0][1] == loaded.tokenizer.decode(answer, skip_special_tokens=True)
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(answer))
    assert reply.usage.total_tokens == len(prompt) + len(answer) and reply.model == MODEL_NAME


def test_system_prompt_and_text_parts_render_with_the_models_template(loaded, client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                             {"type": "text", "text": " of France?"}]}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=5)
    conversation = Conversation([Message("system", "Be brief."), Message("user", PAIRS[0][0])])
    prompt, answer = direct_ids(loaded, conversation, max_new_tokens=5)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == loaded.tokenizer.decode(answer, skip_special_tokens=True)


def test_a_streamed_answer_joins_to_the_plain_one_with_the_models_probabilities(loaded, client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ask(PAIRS[1][0]), temperature=0,
                                            stream=True, logprobs=True, top_logprobs=3,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3  # streamed piece by piece, not in one go
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    assert text == PAIRS[1][1]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].choices == []

    tokens = [t for c in content_chunks for t in c.choices[0].logprobs.content]
    prompt, answer = direct_ids(loaded, Conversation([Message("user", PAIRS[1][0])]), max_new_tokens=64)
    assert chunks[-1].usage.completion_tokens == len(answer) == len(tokens)
    assert [t.token for t in tokens] == [loaded.tokenizer.decode([i]) for i in answer]
    assert "".join(t.token for t in tokens) == text
    # The same log-probabilities from one forward pass over prompt + answer (no cache, no server).
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for k, (token, token_id) in enumerate(zip(tokens, answer)):
        assert abs(token.logprob - expected[k, token_id].item()) <= LOGPROB_TOLERANCE
        best = expected[k].topk(3)
        assert [t.token for t in token.top_logprobs] == [loaded.tokenizer.decode([i]) for i in best.indices.tolist()]
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=LOGPROB_TOLERANCE)
        assert token.bytes == list(token.token.encode())


def test_sixteen_concurrent_requests_are_all_answered(live, client):
    service = live.app.state.service
    before = len(service.queue.batches)

    def one(k: int) -> tuple[str, str | None]:
        question, _ = PAIRS[k % 2]
        if k % 4 == 3:  # a quarter of them streamed
            stream = client.chat.completions.create(model=MODEL_NAME, messages=ask(question), temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream), None
        reply = client.chat.completions.create(model=MODEL_NAME, messages=ask(question), temperature=0)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [text for text, _ in results] == [PAIRS[k % 2][1] for k in range(16)]
    assert all(reason in ("stop", None) for _, reason in results)
    new_batches = service.queue.batches[before:]
    assert sum(new_batches) == 16  # each request was one row of exactly one batch


def test_a_seed_fixes_a_sampled_answer(loaded, client):
    # The memorised model gives its first answer token ~0.95 of the mass, so at a mild temperature five seeds
    # can all draw the same answer on some CPU's numerics; at 3.0 each token is a real draw (checked at
    # top_p 1: five seeds, five different answers), so "the seed does choose" does not hang on luck.
    sampling = dict(temperature=3.0, top_p=0.99)

    def sampled(seed: int) -> str:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=ask("Hello world"), seed=seed,
                                               max_tokens=12, **sampling)
        return reply.choices[0].message.content

    first = sampled(3)
    assert sampled(3) == first
    _, answer = direct_ids(loaded, Conversation([Message("user", "Hello world")]), max_new_tokens=12, seed=3,
                           **sampling)
    assert first == loaded.tokenizer.decode(answer, skip_special_tokens=True)
    assert len({sampled(seed) for seed in range(5)}) > 1  # the seed does choose


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, stream):
    def answer(stop) -> tuple[str, str]:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=ask(PAIRS[0][0]), temperature=0,
                                               stop=stop, stream=stream)
        if not stream:
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        chunks = [c for c in reply if c.choices]
        return ("".join(c.choices[0].delta.content or "" for c in chunks),
                [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][0])

    assert answer("capital") == ("Paris is the ", "stop")
    assert answer(["France", " is"]) == ("Paris", "stop")  # the earliest stop string wins
    assert answer(["not in the answer"]) == (PAIRS[0][1], "stop")


def test_max_tokens_ends_with_length(loaded, client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ask(PAIRS[0][0]), temperature=0, max_tokens=3)
    _, answer = direct_ids(loaded, Conversation([Message("user", PAIRS[0][0])]), max_new_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == loaded.tokenizer.decode(answer, skip_special_tokens=True)


LONG = "The quick brown fox jumps over the lazy dog. " * 150


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"model": "gpt-4o"}, "NotFoundError", "model 'gpt-4o' is not served here; this server serves 'tiny-chat'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "BadRequestError",
     "messages[0].role: unknown role 'robot'; use system, user or assistant"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "BadRequestError",
     "messages[1].role: the last message must be the user's, got 'assistant'"),
    ({"messages": []}, "BadRequestError", "messages: at least one message is needed"),
    ({"messages": [{"role": "user"}]}, "BadRequestError", "messages[0].content: missing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "BadRequestError", "messages[0].content[0]: only text parts are supported, got 'image_url'"),
    ({"messages": [{"role": "user", "content": LONG}]}, "BadRequestError",
     "fills the model's context of 1024 tokens, leaving no room for an answer; shorten the messages"),
    ({"max_tokens": 2000}, "BadRequestError",
     "messages: the prompt (14 tokens) and max_tokens (2000) exceed the model's context of 1024 tokens"),
    ({"temperature": -1}, "BadRequestError", "temperature: must be 0 (greedy) or more, got -1"),
    ({"top_p": 0}, "BadRequestError", "top_p: must be in (0, 1], got 0"),
    ({"max_tokens": 0}, "BadRequestError", "max_tokens: must be at least 1, got 0"),
    ({"n": 2}, "BadRequestError", "n: only one choice per request is supported, got 2"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "BadRequestError", "stop: at most 4 stop strings, got 5"),
    ({"top_logprobs": 2}, "BadRequestError", "top_logprobs: needs logprobs: true"),
    ({"presence_penalty": 0.5}, "BadRequestError", "presence_penalty: not supported by instructune serve"),
    ({"temperature": "hot"}, "BadRequestError", "temperature: Input should be a valid number"),
])
def test_bad_requests_are_refused_clearly(client, change, error, message):
    request = {"model": MODEL_NAME, "messages": ask("hi"), "temperature": 0, **change}
    with pytest.raises(getattr(openai, error)) as raised:
        client.chat.completions.create(**request)
    assert message in raised.value.message


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_api_key_is_required_and_checked(live):
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    status, body = _post(f"{live.url}/v1/chat/completions", b"{}", {})
    assert (status, body["error"]["message"]) == (401, "missing API key: send the header 'Authorization: Bearer KEY'")


def test_a_body_that_is_not_json_is_a_400(live):
    status, body = _post(f"{live.url}/v1/chat/completions", b"{not json", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and body["error"]["message"].startswith("the request body is not valid JSON")


def test_the_chat_page_is_served_self_contained(live):
    with urllib.request.urlopen(f"{live.url}/") as response:
        page = response.read().decode()
    assert response.headers["content-type"].startswith("text/html")
    assert "<script>" in page and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside the machine


# --- the pieces: streamed text and the batching queue ---------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _pieces(tokenizer, text: str, stop: list[str]) -> tuple[list[str], list[list[int]], bool]:
    stream = AnswerText(tokenizer, stop)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [stream.add(i, i) for i in ids]
    pieces.append(stream.finish())
    shown = [p for p in pieces if p is not None]
    return [p.text for p in shown], [p.tokens for p in shown], stream.stopped


def test_answer_text_without_stop_strings_gives_every_token_at_once(tokenizer):
    text = "Paris is the capital of France."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts, tokens, stopped = _pieces(tokenizer, text, [])
    assert texts == [tokenizer.decode([i]) for i in ids] and tokens == [[i] for i in ids] and not stopped


def test_answer_text_holds_back_a_possible_stop_string_and_cuts_at_it(tokenizer):
    texts, tokens, stopped = _pieces(tokenizer, "Paris is the capital of France.", ["the cap", "zzz"])
    assert "".join(texts) == "Paris is " and stopped
    # "the" may begin "the cap": held back until " capital" shows it does, then cut.
    assert texts[-1] == " "
    # Tokens go with the piece their text begins in: " the" begins in the last piece's " ".
    assert sum(tokens, []) == tokenizer("Paris is the", add_special_tokens=False)["input_ids"]


def test_answer_text_releases_a_held_back_prefix_that_was_no_stop(tokenizer):
    texts, _, stopped = _pieces(tokenizer, "Paris is the capital of France.", ["France!"])
    assert "".join(texts) == "Paris is the capital of France." and not stopped


def test_answer_text_waits_for_a_whole_character(tokenizer):
    ids = tokenizer("é ok", add_special_tokens=False)["input_ids"]
    # The tiny tokenizer never saw "é": its two bytes are two tokens.
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    stream = AnswerText(tokenizer)
    assert stream.add(ids[0], "first") is None
    piece = stream.add(ids[1], "second")
    assert piece.text == "é" and piece.tokens == ["first", "second"]


def test_the_queue_batches_requests_that_wait_together(loaded):
    gate = threading.Event()
    events: dict[int, list] = {}

    def collect(k: int, block: bool = False):
        def emit(event):
            if block:
                gate.wait(60)  # holds the worker inside the first batch while the others queue
            events.setdefault(k, []).append(event)
        return emit

    queue = GenerationQueue(loaded, batch_size=16)
    prompts = encode_prompts(loaded.tokenizer, loaded.template,
                             [Conversation([Message("user", PAIRS[k % 2][0])]) for k in range(17)])
    try:
        queue.submit(Job(prompt=prompts[0], max_tokens=64, emit=collect(0, block=True)))
        deadline = time.monotonic() + 60
        while not queue.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        for k in range(1, 17):
            queue.submit(Job(prompt=prompts[k], max_tokens=64, emit=collect(k)))
        # A seeded, sampled job never joins a batch; a greedy one later never joins it either.
        queue.submit(Job(prompt=prompts[0], max_tokens=4, temperature=1.0, seed=1, emit=collect(17)))
        gate.set()
        while len([k for k in events if events[k][-1][0] == "done"]) < 18 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.close()
    assert queue.batches == [1, 16, 1]
    for k in range(17):
        text = "".join(event[1].text for event in events[k] if event[0] == "piece")
        assert text == PAIRS[k % 2][1] and events[k][-1][:2] == ("done", "stop")
    assert events[17][-1] == ("done", "length", 4)


# --- the command ------------------------------------------------------------------------------------

def test_serve_without_fastapi_names_the_extra(monkeypatch):
    import importlib.util

    from instructune.commands import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(UserError, match=r"^instructune serve needs fastapi: pip install 'instructune\[serve\]'$"):
        serve.check_serving_stack()


def test_serve_refuses_a_port_in_use():
    from instructune.commands.serve import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            check_port_free("127.0.0.1", port)


def test_the_serve_command_serves_a_checkpoint(loaded, tmp_path):
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "instructune", "serve", "--model", str(tmp_path),
                              "--port", str(port), "--model-name", "mine"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert child.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        reply = client.chat.completions.create(model="mine", messages=ask(PAIRS[1][0]), temperature=0)
        assert reply.choices[0].message.content == PAIRS[1][1]
    finally:
        child.terminate()
        output, _ = child.communicate(timeout=30)
    assert f"serving mine on http://127.0.0.1:{port}" in output


def test_a_conversation_the_template_refuses_is_a_400(loaded):
    from instructune.testing import CHATML_TEMPLATE
    from instructune.use.loading import LoadedModel
    from instructune.use.openai_api import ApiError, ChatRequest, check_request
    from instructune.use.server import ChatService

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML_TEMPLATE)
    service = ChatService(LoadedModel.wrap(loaded.model, loaded.tokenizer, no_system), model_name=MODEL_NAME)
    service.start()
    try:
        request = ChatRequest(model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}] + ask("hi"))
        with pytest.raises(ApiError) as raised:
            service.prompt_and_limit(check_request(request, MODEL_NAME))
        # Without the system turn the same template renders, and the prompt is the plain ChatML one.
        plain = ChatRequest(model=MODEL_NAME, messages=ask("hi"))
        prompt, limit = service.prompt_and_limit(check_request(plain, MODEL_NAME))
    finally:
        service.stop()
    assert raised.value.status == 400
    assert raised.value.message == ("messages: the model's chat template refused this conversation "
                                    "(System role not supported)")
    assert prompt == encode_prompts(loaded.tokenizer, CHATML_TEMPLATE, [Conversation([Message("user", "hi")])])[0]
    assert limit == 512  # the default answer length: the context (1024) has room for it


def test_a_cancelled_job_gets_no_more_steps_and_the_queue_goes_on(loaded):
    prompts = encode_prompts(loaded.tokenizer, loaded.template, [Conversation([Message("user", q)]) for q, _ in PAIRS])
    events: list = []
    done = threading.Event()

    def leave_after_first_piece(event):  # a client that goes away once it has seen one piece
        events.append(event)
        cancelled.cancelled = True

    cancelled = Job(prompt=prompts[0], max_tokens=64, emit=leave_after_first_piece)
    later: list = []
    queue = GenerationQueue(loaded)
    try:
        queue.submit(cancelled)
        queue.submit(Job(prompt=prompts[1], max_tokens=64, temperature=1.0, seed=0,  # runs alone, after
                         emit=lambda event: (later.append(event), event[0] == "done" and done.set())))
        assert done.wait(120)
    finally:
        queue.close()
    assert [event[0] for event in events] == ["piece"]  # no further pieces, no "done": nobody is listening
    assert later[-1][:2] == ("done", "stop") and queue.batches == [1, 1]
