"""The chat page of `instructune serve` works in a real headless browser (Debian's Chromium, driven by
Playwright): a question typed, the answer streamed in, token probabilities shown and hidden, a screenshot."""

from __future__ import annotations

import os

import pytest

from server_fixtures import API_KEY, MODEL_NAME, PAIRS, memorised_model, start_server

CHROMIUM = "/usr/bin/chromium"
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent (`bash scripts/setup.sh test` installs Debian's chromium)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def live():
    server = start_server(memorised_model(), api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def page(live, tmp_path):
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1100, "height": 700})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


def _ask(page, question: str, *, enter: bool = False) -> None:
    page.get_by_test_id("prompt").fill(question)
    if enter:
        page.get_by_test_id("prompt").press("Enter")  # Enter sends (Shift+Enter would be a new line)
    else:
        page.get_by_test_id("send").click()


def test_the_page_streams_an_answer_and_shows_token_probabilities(live, page, tmp_path):
    streamed_chunks = []
    page.on("response", lambda r: streamed_chunks.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(live.url)
    page.get_by_test_id("api-key").fill(API_KEY)
    page.get_by_test_id("api-key").dispatch_event("change")
    page.wait_for_function(f"document.querySelector('[data-testid=model]').textContent === {MODEL_NAME!r}")

    _ask(page, PAIRS[0][0], enter=True)
    answer = page.locator(".message.assistant").last
    page.wait_for_selector(".message.assistant[data-state=done]")
    assert page.locator("[data-testid=user-message]").last.inner_text().endswith(PAIRS[0][0])
    assert answer.inner_text().endswith(PAIRS[0][1])
    assert streamed_chunks and streamed_chunks[0].headers["content-type"].startswith("text/event-stream")

    # The toggle colours every token of the answer already shown; the probabilities join to the answer.
    page.get_by_test_id("show-probabilities").check()
    tokens = answer.locator(".token")
    assert "".join(tokens.all_inner_texts()) == PAIRS[0][1]
    probabilities = [float(p) for p in tokens.evaluate_all("spans => spans.map(s => s.dataset.p)")]
    assert len(probabilities) == tokens.count() > 3
    assert all(0 < p <= 1 for p in probabilities)
    assert min(probabilities) > 0.9  # a memorised answer: the model was sure of every token
    assert tokens.first.get_attribute("title") == f"p = {probabilities[0]:.4f}"

    # A second turn streams with the toggle on: its tokens come coloured as they arrive.
    _ask(page, PAIRS[1][0])
    page.wait_for_function("document.querySelectorAll('.message.assistant[data-state=done]').length === 2")
    second = page.locator(".message.assistant").last
    assert "".join(second.locator(".token").all_inner_texts()) == PAIRS[1][1]
    screenshot = tmp_path / "chat_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("INSTRUCTUNE_SCREENSHOT"):  # to look at it: INSTRUCTUNE_SCREENSHOT=path pytest ...
        screenshot.replace(os.environ["INSTRUCTUNE_SCREENSHOT"])

    page.get_by_test_id("show-probabilities").uncheck()
    assert second.locator(".token").count() == 0 and second.inner_text().endswith(PAIRS[1][1])


def test_the_page_shows_a_refusal(live, page):
    page.goto(live.url)  # no API key entered: the server refuses, and the page says why
    _ask(page, "Hello?")
    error = page.get_by_test_id("error-message")
    error.wait_for()
    assert "missing API key" in error.inner_text()
