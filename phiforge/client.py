"""The one client for OpenAI-compatible HTTP endpoints (`phiforge serve`, vLLM, llama.cpp, OpenAI itself).

`Client.post` retries timeouts, connection errors, 408/409/429 and 5xx with exponential backoff (honouring
Retry-After); other 4xx are the caller's fault and are not retried; both end in RequestFailed (a UserError, so a CLI
shows it as one line). `ChatClient` adds what `data annotate` (the judge) and `data synth` (the teacher) need:
bounded concurrency (`map`) and a response cache; the eval model/judge backend (eval/openai_backend.py) posts
through `Client`.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx

from phiforge.utils import UserError

RETRY_STATUS = {408, 409, 429}  # and every 5xx


class RequestFailed(UserError):
    pass


class Client:
    """POSTs JSON to `<base_url><path>` with retries; counts requests, retries, timeouts and failures in .stats."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, concurrency: int = 8, flag: str = "--base-url"):
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"{flag} {base_url!r}: give the endpoint's URL, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.concurrency = max_retries, max(1, concurrency)
        self.backoff, self.max_backoff = backoff, max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=self.concurrency))
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0, "timeouts": 0}
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def post(self, path: str, body: dict, *, answer=lambda j: j) -> object:
        """`answer(response JSON)` of the first 200 reply whose JSON `answer` can read (a malformed one is retried).
        Raises RequestFailed on a 4xx the caller caused, or once retries are spent."""
        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                r = self.http.post(url, json=body)
            except httpx.TimeoutException:
                self._count("timeouts")
                last = "timed out"
            except httpx.TransportError as e:
                last = f"connection error: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return answer(r.json())
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"malformed response: {r.text[:200]}"
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    ra = r.headers.get("retry-after")
                    if ra and ra.replace(".", "", 1).isdigit():
                        wait = min(self.max_backoff, float(ra))
                else:
                    self._count("failures")
                    raise RequestFailed(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
            if attempt < self.max_retries:
                time.sleep(wait)
        self._count("failures")
        raise RequestFailed(f"{url}: gave up after {self.max_retries + 1} attempts ({last})")

    def get(self, path: str) -> dict:
        """One GET (no retries: used to ask a server what it serves)."""
        r = self.http.get(self.base_url + path)
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.http.close()


class ChatClient(Client):
    """One user prompt -> the assistant's reply, with a response cache and bounded concurrency.

    The cache (`<out>/.responses.cache`, named so that no stage or `phiforge tokenize` mistakes it for data) is an
    append-only jsonl log keyed by a hash of the request body: a rerun, or a run resumed after a kill,
    pays only for requests never answered. A torn last line (killed mid-write) is skipped when the log is read.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, concurrency: int = 8, cache: str | Path | None = None,
                 backoff: float = 0.5, max_backoff: float = 30.0):
        super().__init__(base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY"), timeout=timeout,
                         max_retries=max_retries, backoff=backoff, max_backoff=max_backoff, concurrency=concurrency)
        self.model = model
        self.cache_path = Path(cache) if cache else None
        self.cache: dict[str, str] = {}
        if self.cache_path and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    self.cache[rec["key"]] = rec["content"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn write from a killed run

    def _body(self, prompt: str, params: dict) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], **params}

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()

    def _remember(self, key: str, content: str) -> None:
        with self._lock:
            self.cache[key] = content
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n")

    def complete(self, prompt: str, **params) -> str:
        """The assistant's reply to one user prompt. Raises RequestFailed once retries are spent."""
        body = self._body(prompt, params)
        key = self.key(body)
        if key in self.cache:
            self._count("cache_hits")
            return self.cache[key]
        content = self.post("/chat/completions", body, answer=lambda j: j["choices"][0]["message"]["content"])
        self._remember(key, content)
        return content

    def map(self, prompts: list[str], **params) -> Iterator[str | RequestFailed]:
        """Replies in prompt order, at most `concurrency` requests in flight; a failure is yielded, not raised."""
        def one(p: str):
            try:
                return self.complete(p, **params)
            except RequestFailed as e:
                return e

        with ThreadPoolExecutor(self.concurrency) as pool:
            yield from pool.map(one, prompts)


def add_client_args(ap) -> None:
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                    help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)")
    ap.add_argument("--model", default="default", help="model name sent to the endpoint")
    ap.add_argument("--api-key", default=None, help="bearer token (default $OPENAI_API_KEY)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--max-retries", type=int, default=5)
    ap.add_argument("--backoff", type=float, default=0.5, help="first retry waits this long, then doubles")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)


def client_from_args(args, cache: Path) -> ChatClient:
    return ChatClient(args.base_url, args.model, api_key=args.api_key, timeout=args.timeout,
                      max_retries=args.max_retries, concurrency=args.concurrency, cache=cache, backoff=args.backoff)


def gen_params(args) -> dict:
    return {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
