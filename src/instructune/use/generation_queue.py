"""One worker thread answers every request of a server, batching the ones that can share a forward pass.

A model's forward is not thread-safe, so requests wait in a queue and one thread runs the model. When
it is free it takes the oldest waiting request and every other waiting one that can join it, up to
`batch_size`, and decodes them together (left-padded, `instructune.use.generation`), giving each
request its tokens as they come. Which requests can join: greedy ones always (their tokens do not
depend on the batch); sampled ones without a seed when their temperature and top_p match; a seeded,
sampled request runs alone, so its seed alone fixes its answer (the same answer however busy the
server is). Requests arriving while a batch runs wait for the next one (no joining a running batch).

The queue is bounded: beyond `max_waiting` waiting requests, `submit` raises `QueueFull` (the server
answers 503 with a Retry-After estimated from how long batches take). A cancelled request (its client went
away, or it ran out of time) leaves the queue at once if it was waiting, and stops at its batch's next
token if it was running. `drain` (the server is stopping) refuses what waits and lets the running batch end.

Each token's probability is recorded as it is picked: the softmax of that step's logits after
temperature (temperature 1 for greedy), before top_p, i.e. what the model gave the token.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from instructune.use.answer_text import AnswerText, Piece
from instructune.use.generation import decode_steps, left_pad, token_picker


@dataclass
class TokenScore:
    """What the model gave one generated token: its log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Job:
    """One request to answer: its prompt ids, settings, and where its pieces go.

    `emit` receives, from the worker thread, `("piece", Piece)` for each piece of text, then
    `("done", finish_reason, completion_tokens)` or `("error", message)`.
    """

    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    cancelled: bool = False
    """Set by the server when the client went away: the worker stops spending steps on it."""
    deadline: float | None = None
    """When the server gives up on it (its event loop's clock), or None."""
    finished: bool = False
    """Set by the worker once the job has had its last event (or was dropped, cancelled)."""

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a batch; None: this job runs alone."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sampled", self.temperature, self.top_p)


class QueueFull(Exception):
    """The queue holds `max_waiting` requests already; `retry_after` (seconds) is when room is likely."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} request(s) are waiting already")
        self.waiting, self.retry_after = waiting, retry_after


class QueueClosed(Exception):
    """The server is shutting down and takes no more requests."""


class _Scorer:
    """A token picker that also records each picked token's log-probability (and the top ones)."""

    def __init__(self, pick: Callable[[torch.Tensor], torch.Tensor], temperature: float, top: int, wanted: bool):
        self.pick, self.temperature, self.top, self.wanted = pick, temperature or 1.0, top, wanted
        self.scores: list[TokenScore] | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        chosen = self.pick(logits)
        if self.wanted:
            logprobs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            picked = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
            best = logprobs.topk(self.top, dim=-1) if self.top else None
            self.scores = [
                TokenScore(int(token), value, list(zip(best.indices[row].tolist(), best.values[row].tolist()))
                           if best is not None else [])
                for row, (token, value) in enumerate(zip(chosen.tolist(), picked))]
        return chosen


class GenerationQueue:
    """The worker thread and its queue; `submit` a `Job`, `close` to stop the thread."""

    def __init__(self, loaded, *, batch_size: int = 16, max_waiting: int | None = None):
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_waiting = max_waiting
        """Most requests waiting for a batch (None: no bound); more are refused with `QueueFull`."""
        loaded.model.eval()  # only this thread runs the model from now on, always for inference
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        """The jobs of the batch under way."""
        self.ready = threading.Condition()
        self.closed = False
        self.draining = False
        self.batch_seconds = 1.0
        """How long a batch has been taking (a running mean): what Retry-After is estimated from."""
        self.batches: list[int] = []
        """The size of every batch run so far (how much batching happened)."""
        self.tokenizer_lock = threading.Lock()
        """Held while the worker decodes; the server holds it to encode prompts. A fast tokenizer's Rust
        object may be reconfigured by an encode call, which must not overlap a decode in another thread."""
        self.thread = threading.Thread(target=self._work, name="instructune-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; its pieces go to `job.emit` from the worker thread. `QueueFull` when `max_waiting`
        jobs wait already, `QueueClosed` once the queue is draining or closed."""
        with self.ready:
            if self.closed or self.draining:
                raise QueueClosed("the server is shutting down")
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise QueueFull(len(self.waiting), self.retry_after())
            self.waiting.append(job)
            self.ready.notify()

    def cancel(self, job: Job) -> None:
        """Stop answering `job`: out of the queue now if it waits, at its batch's next token if it runs."""
        job.cancelled = True
        with self.ready:
            if job in self.waiting:
                self.waiting.remove(job)
                job.finished = True

    def retry_after(self) -> int:
        """Seconds until a new request is likely to find room: the batches ahead of it, at their recent pace."""
        ahead = 1 + len(self.waiting) // max(self.batch_size, 1)
        return max(1, math.ceil(self.batch_seconds * ahead))

    def stats(self) -> dict[str, int | None]:
        """`waiting` (queued), `running` (unfinished jobs of the batch under way) and `max_waiting`."""
        with self.ready:
            return {"waiting": len(self.waiting), "running": sum(not job.finished for job in self.running),
                    "max_waiting": self.max_waiting}

    def drain(self) -> None:
        """Take no more jobs, refuse the waiting ones (an error event with status 503), let the running batch end."""
        with self.ready:
            self.draining = True
            refused, self.waiting = list(self.waiting), deque()
        for job in refused:
            job.finished = True
            job.emit(("error", "the server is shutting down", 503))

    def close(self) -> None:
        """Stop the worker once its current batch ends; jobs still waiting get an error."""
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=60)
        for job in self.waiting:
            job.emit(("error", "the server is shutting down", 503))

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that can join it (blocks until there is one)."""
        with self.ready:
            while not self.waiting and not self.closed:
                self.ready.wait()
            if self.closed:
                return []
            first = self.waiting.popleft()
            while first.cancelled and self.waiting:
                first = self.waiting.popleft()
            batch, key = [first], first.batch_key()
            if key is not None:
                for job in list(self.waiting):
                    if len(batch) == self.batch_size:
                        break
                    if job.batch_key() == key:
                        self.waiting.remove(job)
                        batch.append(job)
            self.running = [job for job in batch if not job.cancelled]
            return batch

    def _work(self) -> None:
        while True:
            batch = [job for job in self._next_batch() if not job.cancelled]
            if self.closed:
                return
            if not batch:
                continue
            self.batches.append(len(batch))
            started = time.monotonic()
            try:
                self._run(batch)
            except Exception as error:  # a failed batch fails its requests, not the server
                for job in batch:
                    job.emit(("error", f"generation failed: {type(error).__name__}: {error}"))
            finally:
                for job in batch:
                    job.finished = True
                self.batch_seconds = 0.7 * self.batch_seconds + 0.3 * (time.monotonic() - started)

    def _run(self, batch: list[Job]) -> None:
        loaded = self.loaded
        model, device = loaded.model, loaded.device
        first = batch[0]
        scorer = _Scorer(token_picker(first.temperature, first.top_p, first.seed, device), first.temperature,
                         max(job.top_logprobs for job in batch), any(job.logprobs for job in batch))
        ids, mask = left_pad([job.prompt for job in batch], loaded.pad_token_id)
        texts = [AnswerText(loaded.tokenizer, job.stop) for job in batch]
        finished: list[str | None] = [None] * len(batch)
        stop_ids = set(loaded.stop_token_ids)
        steps = decode_steps(model, ids.to(device), mask.to(device), pad_token_id=loaded.pad_token_id,
                       stop_token_ids=loaded.stop_token_ids, max_new_tokens=max(job.max_tokens for job in batch),
                       pick=scorer)
        try:
            for tokens in steps:
                with self.tokenizer_lock:
                    self._take_step(batch, texts, finished, tokens.tolist(), scorer.scores, stop_ids)
                if all(reason is not None for reason in finished):
                    break
        finally:
            steps.close()
        with self.tokenizer_lock:
            for job, text, reason in zip(batch, texts, finished):
                if reason is None:  # the steps ran out: every row reached the batch's longest max_tokens
                    self._finish(job, text, "length")

    def _take_step(self, batch: list[Job], texts: list[AnswerText], finished: list[str | None], tokens: list[int],
                   scores: list[TokenScore] | None, stop_ids: set[int]) -> None:
        """Give each unfinished row its new token; mark (in `finished`) the rows that end here, and why."""
        for row, (job, text, token) in enumerate(zip(batch, texts, tokens)):
            if finished[row] is not None:
                continue
            if job.cancelled:
                finished[row] = "cancelled"
            elif token in stop_ids:
                finished[row] = "stop"
            else:
                self._emit(job, text.add(token, scores[row] if scores else None))
                if text.stopped:
                    finished[row] = "stop"
                elif len(text.ids) >= job.max_tokens:
                    finished[row] = "length"
            if finished[row] is not None:
                self._finish(job, text, finished[row])

    @staticmethod
    def _emit(job: Job, piece: Piece | None) -> None:
        if piece is not None:
            job.emit(("piece", piece))

    def _finish(self, job: Job, text: AnswerText, reason: str) -> None:
        job.finished = True
        if reason == "cancelled":
            return
        self._emit(job, text.finish())
        # A stop string ends the answer where it begins; the tokens counted are those generated.
        job.emit(("done", reason, len(text.ids)))


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token on its own (a part of a character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def scores_as_logprobs(tokenizer, scores: list[Any], top: int) -> list[dict[str, Any]]:
    """Recorded `TokenScore`s in OpenAI's `logprobs.content` shape, with `top` alternatives each (a batch
    records as many as its most demanding request asked for)."""
    from instructune.use.openai_api import token_logprob

    return [token_logprob(token_text(tokenizer, s.token_id), s.logprob,
                          [(token_text(tokenizer, t), v) for t, v in s.top[:top]]) for s in scores if s is not None]
