"""A bounded soak of `phiforge serve` on loopback (issue 34, item 11): a few concurrent clients send plain and
streamed chats (a third of the streams dropped after their first chunk), completions and fuzzed bodies for
PHIFORGE_SOAK_SECONDS (default 20). Passes when no answer is a 5xx, every greedy answer to a prompt equals the
first one, the server is still healthy, and the process RSS grew by less than RSS_BOUND_MB after warm-up."""
from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
import pytest

from phiforge import load
from phiforge.checkpoint import save_hf_folder

SECONDS = float(os.environ.get("PHIFORGE_SOAK_SECONDS", "20"))
RSS_BOUND_MB = 64  # the KV cache and the model are allocated before the baseline; what grows after is a leak
PROMPTS = ["Tom and Lily", "Once upon a time", "The quick brown fox", "Pip liked to count"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fuzzed_body(rnd: random.Random) -> bytes:
    """Malformed, mistyped, oversized-number, deeply nested and random-byte bodies: each must be a 4xx."""
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    kind = rnd.randrange(8)
    if kind == 0:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
    if kind == 1:
        return b'{"a":' * rnd.randrange(100, 20000)
    if kind == 2:
        return json.dumps(good).encode()[:rnd.randrange(1, 40)]
    if kind == 3:
        return json.dumps({**good, "max_tokens": rnd.choice(["7", -1, 1e300, [1], {}])}).encode()
    if kind == 4:
        return json.dumps({**good, "messages": rnd.choice([[], "hi", [{"role": "x"}], [[[[]]]]])}).encode()
    if kind == 5:
        return json.dumps({**good, "temperature": rnd.choice([-1, 3, "hot"]), "stop": [""]}).encode()
    if kind == 6:
        return ("[" * rnd.randrange(500, 5000)).encode()
    return json.dumps({**good, "logit_bias": {"x": 1}, "top_p": 2}).encode()


@pytest.mark.timeout(SECONDS + 240)
def test_soak_no_5xx_same_greedy_answers_bounded_rss(trained_tokenizer, tmp_path):
    from phiforge.serve import start_background

    model, _ = load("tiny", seed=0)
    folder = save_hf_folder(model, tmp_path / "m", trained_tokenizer)
    url, stop = start_background(str(folder), model_id="tiny", max_batch=4, max_queue=64)
    stats = {"requests": 0, "5xx": [], "changed": [], "dropped": 0, "fuzz": 0}
    first: dict[tuple, str] = {}
    lock = threading.Lock()

    def record(status: int, what: str, text: str = "") -> None:
        with lock:
            stats["requests"] += 1
            if status >= 500:
                stats["5xx"].append((what, status, text[:200]))

    def same(key: tuple, answer: str) -> None:
        with lock:
            if first.setdefault(key, answer) != answer:
                stats["changed"].append((key, first[key], answer))

    def chat(c: httpx.Client, rnd: random.Random) -> None:
        p = rnd.choice(PROMPTS)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}], "max_tokens": 12,
                                                 "temperature": 0})
        record(r.status_code, "chat", r.text)
        if r.status_code == 200:
            same(("chat", p), r.json()["choices"][0]["message"]["content"])

    def streamed(c: httpx.Client, rnd: random.Random) -> None:
        p, drop = rnd.choice(PROMPTS), rnd.random() < 1 / 3
        body = {"messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            parts = []
            for line in r.iter_lines():
                if drop:  # walk away after the first chunk: the server must cancel and free the row
                    with lock:
                        stats["dropped"] += 1
                    break
                if line.startswith("data: {"):
                    parts.append(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                                 if json.loads(line[6:]).get("choices") else "")
        record(r.status_code, "stream")
        if r.status_code == 200 and not drop:
            same(("chat", p), "".join(parts))

    def completion(c: httpx.Client, rnd: random.Random) -> None:
        p = rnd.choice(PROMPTS)
        r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
        record(r.status_code, "completion", r.text)
        if r.status_code == 200:
            same(("completion", p), r.json()["choices"][0]["text"])

    def fuzz(c: httpx.Client, rnd: random.Random) -> None:
        path = rnd.choice(["/v1/chat/completions", "/v1/completions"])
        r = c.post(path, content=fuzzed_body(rnd), headers={"content-type": "application/json"})
        with lock:
            stats["fuzz"] += 1
        record(r.status_code, "fuzz", r.text)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])

    def client(seed: int, deadline: float, errors: list) -> None:
        rnd = random.Random(seed)
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                while time.monotonic() < deadline:
                    rnd.choice([chat, streamed, completion, fuzz])(c, rnd)
        except Exception as e:  # noqa: BLE001 - reported below with the client's seed
            errors.append(f"client {seed}: {type(e).__name__}: {e}")

    try:
        warm: list = []
        client(100, time.monotonic() + 3, warm)  # warm-up: allocator pools, first-call caches
        assert not warm, warm
        before = rss_mb()
        errors: list = []
        threads = [threading.Thread(target=client, args=(i, time.monotonic() + SECONDS, errors)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 120)
        after = rss_mb()
        health = httpx.get(url + "/health", timeout=10)
    finally:
        stop()
    print(f"soak {SECONDS:.0f}s: {stats['requests']} requests ({stats['fuzz']} fuzzed, {stats['dropped']} streams "
          f"dropped), {len(stats['5xx'])} 5xx, {len(stats['changed'])} changed answers, RSS {before:.0f} -> "
          f"{after:.0f} MB")
    assert not errors, errors[:3]
    assert not stats["5xx"], stats["5xx"][:3]
    assert not stats["changed"], stats["changed"][:3]
    assert health.status_code == 200 and health.json()["running"] == 0
    assert stats["requests"] > 50 and stats["dropped"] > 0 and stats["fuzz"] > 0
    assert after - before < RSS_BOUND_MB, (before, after)
