"""Scheduling for the server: one thread owns the model and a `batch.BatchState`; HTTP handlers submit
`Job`s and read their tokens from an asyncio queue.

Between any two engine steps the thread (1) drops cancelled jobs (client gone) from their rows, (2) admits waiting
jobs into free rows (BatchState prefills them at the next step while the other rows decode), (3) runs one
`BatchState.step()` and hands each Event to its job. Sampling, penalties, detokenization and stop strings are
phiforge.sample's, batching is phiforge.batch's, log-probs are phiforge.scoring's; this module only schedules.
Waiting jobs beyond `max_queue` are refused (HTTP 429).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import traceback
from dataclasses import dataclass

import torch

from phiforge.sample import GenerationConfig
from phiforge.batch import BatchState
from phiforge.scoring import score_hidden, score_logits


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class Closing(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclass
class Chunk:
    """What a job receives: one generated token (text delta, logprobs), or the prompt's logprobs, or an error."""
    index: int  # the job's index within its request (completions with a list of prompts)
    token_id: int | None = None
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prompt_logprobs: list | None = None  # echo: [(id, logprob | None, top | None)] for every prompt token
    error: str | None = None


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    config: GenerationConfig | None  # None: score the prompt only (max_tokens 0)
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int = 0
    logprobs: int | None = None  # top alternatives per token (0: chosen token only); None: no logprobs
    echo: bool = False  # also score the prompt tokens
    cancelled: bool = False
    done: bool = False
    n_generated: int = 0

    def emit(self, chunk: Chunk) -> None:
        if chunk.finish_reason is not None or chunk.error is not None:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
        except RuntimeError:  # the event loop is gone (server stopped)
            pass


def _top(ids: torch.Tensor, lps: torch.Tensor) -> list[tuple[int, float]]:
    return list(zip(ids.tolist(), lps.tolist()))


def score_prompt(model, ids: list[int], k: int, chunk: int = 256) -> list:
    """Log-probabilities of each prompt token given the ones before it (one forward pass, no cache):
    [(id, logprob | None, top-k | None)]; the first token has none, as in OpenAI's echo."""
    out = [(ids[0], None, None)]
    with torch.inference_mode():
        h = model(torch.tensor([ids], device=model.device), return_hidden=True)[0]  # (T, C)
        targets = torch.tensor(ids[1:], device=model.device)
        s = score_hidden(model, h[:-1], targets, top=k, chunk=chunk)  # position t predicts ids[t + 1]
        lp = s.logprob.tolist()
        for j, t in enumerate(ids[1:]):
            out.append((t, lp[j], _top(s.top_ids[j], s.top_logprobs[j]) if k else None))
    return out


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int = 2048, max_queue: int = 64,
                 compile: bool = False):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.state = BatchState(model, tokenizer, max_batch=max_batch, max_len=max_len, compile=compile)
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False  # refuse new jobs (graceful shutdown: running ones finish)
        self.stopped = False
        self.stats = collections.Counter()  # requests, tokens, cancelled, errors
        self.thread = threading.Thread(target=self._run, name="phiforge-scheduler", daemon=True)

    # -- called from the HTTP side -------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self.cond:
            if self.closing or self.stopped:
                raise Closing("the server is shutting down")
            free = self.max_batch - self.running()
            if len(self.waiting) + len(jobs) > self.max_queue + max(free, 0):
                raise QueueFull(f"the server is busy: {self.running()} running, {len(self.waiting)} waiting "
                                f"(max batch {self.max_batch}, max queue {self.max_queue}); retry later")
            self.waiting.extend(jobs)
            self.stats["requests"] += len(jobs)
            self.cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client is gone: a waiting job is dropped now, a running one frees its row before the next step."""
        with self.cond:
            for job in jobs:
                if job.done:
                    continue
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)
                    job.done = True
                    self.stats["cancelled"] += 1
            self.cond.notify()

    def running(self) -> int:
        return self.max_batch - self.state.free_rows()

    def health(self) -> dict:
        return {"running": self.running(), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "context": self.max_len,
                **{k: self.stats[k] for k in ("requests", "tokens", "cancelled", "errors", "peak_running")}}

    def close(self) -> None:
        """Refuse new jobs; running and waiting ones go on."""
        with self.cond:
            self.closing = True

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; jobs still waiting or running get an error."""
        with self.cond:
            self.closing = self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the scheduler thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopped and not self.waiting and not self.state.active():
                    self.cond.wait()
                if self.stopped:
                    break
                admit = []
                free = self.state.free_rows()
                while self.waiting and len(admit) < free:
                    admit.append(self.waiting.popleft())
            self._drop_cancelled()
            for job in admit:
                self._admit(job)
            self.stats["peak_running"] = max(self.stats["peak_running"], self.running())
            if not self.state.active():
                continue
            try:
                events = self.state.step()
            except Exception as e:  # a bug or OOM: fail the running jobs, keep serving
                traceback.print_exc()
                for seq in self.state.active():
                    self.state.remove(seq)
                    seq.tag.emit(Chunk(seq.tag.index, error=f"generation failed: {type(e).__name__}: {e}"))
                    self.stats["errors"] += 1
                continue
            self._deliver(events)
        for job in list(self.waiting) + [s.tag for s in self.state.active()]:
            job.emit(Chunk(job.index, error="the server is shutting down"))
        for seq in self.state.active():
            self.state.remove(seq)
        self.waiting.clear()

    def _drop_cancelled(self) -> None:
        for seq in self.state.active():
            if seq.tag.cancelled:
                self.state.remove(seq)  # frees the row and resets its cache positions
                self.stats["cancelled"] += 1
                seq.tag.emit(Chunk(seq.tag.index, finish_reason="cancelled"))

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self.stats["cancelled"] += 1
            job.emit(Chunk(job.index, finish_reason="cancelled"))
            return
        try:
            if job.echo:
                job.emit(Chunk(job.index, prompt_logprobs=score_prompt(self.model, job.prompt_ids, job.logprobs or 0)))
            if job.config is None:
                job.emit(Chunk(job.index, finish_reason="length"))
                return
            self.state.add(job.prompt_ids, job.config, index=job.index, tag=job)
        except Exception as e:
            self.stats["errors"] += 1
            job.emit(Chunk(job.index, error=str(e)))

    def _deliver(self, events) -> None:
        """Hand each Event to its job; one wake-up of each event loop per step, not one per token."""
        by_loop: dict = {}
        for ev in events:
            job: Job = ev.seq.tag
            job.n_generated += 1
            chunk = Chunk(job.index, ev.token_id, ev.text, ev.finish_reason)
            if job.logprobs is not None and ev.logits is not None:
                s = score_logits(ev.logits[None], torch.tensor([ev.token_id], device=ev.logits.device),
                                 top=job.logprobs)
                chunk.logprob = float(s.logprob[0])
                chunk.top = _top(s.top_ids[0], s.top_logprobs[0]) if job.logprobs else None
            if ev.finish_reason is not None:
                job.done = True
            by_loop.setdefault(job.loop, []).append((job.queue, chunk))
        self.stats["tokens"] += len(events)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is gone (server stopped)
                pass


def _put_all(items) -> None:
    for queue, chunk in items:
        queue.put_nowait(chunk)
