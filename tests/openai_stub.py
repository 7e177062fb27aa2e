"""A small real HTTP server speaking the OpenAI chat-completions protocol on 127.0.0.1, with fault injection.

    with OpenAIStub() as stub:                      # stub.url == "http://127.0.0.1:<port>/v1"
        stub.faults = ["429", "500", "delay:2"]     # the next requests misbehave in this order, then all is well
        ...
        stub.requests                               # how many requests arrived

Replies are deterministic functions of the prompt, so tests can check what came back:
  * a prompt containing "Educational score" (the annotation rubric) gets a justification ending in
    "Educational score: N", N = 5 if the extract has the word "photosynthesis", 1 if "casino", else 3;
  * any other prompt gets a "story" that repeats the prompt's quoted words, long enough to pass filters.
Run alone for manual testing: `python tests/openai_stub.py --port 8001`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_for(prompt: str) -> str:
    if "Educational score" in prompt:
        extract = prompt.split("The extract:", 1)[-1].lower()
        score = 5 if "photosynthesis" in extract else 1 if "casino" in extract else 3
        return f"The extract is judged on the rubric.\nEducational score: {score}"
    quoted = re.findall(r'"([^"]+)"', prompt) or ["thing"]
    seed = hashlib.sha256(prompt.encode()).hexdigest()
    names = ["Tom", "Lily", "Ben", "Mia", "Sam", "Zoe"]
    name = names[int(seed[:2], 16) % len(names)]
    lines = ["{n} found a {w} near the old tree and smiled.", "Then a little bird asked {n} about the {w}.",
             "\"Can I see your {w}?\" asked the bird, and {n} said yes.",
             "They played with the {w} until the sun went down.",
             "Mom called from the house, so {n} carried the {w} home.", "It was the best {w} in the whole town."]
    body = " ".join(lines[k % len(lines)].format(n=name, w=w) for k, w in enumerate(quoted))
    return (f"Once upon a time there was a child called {name} ({seed[:12]}). {body} "
            f"{name} went home, had some warm milk and told mom all about the day. The end.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # keep test output clean
        pass

    def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        stub: OpenAIStub = self.server.stub
        try:  # a client killed mid-request leaves a torn body: answer 400, as a real server would
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            prompt = body["messages"][-1]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return self._send(400, {"error": {"message": "malformed request"}})
        fault = stub._next_fault()
        if fault == "429":
            return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        if fault == "500":
            return self._send(500, {"error": {"message": "boom"}})
        if fault and fault.startswith("delay:"):
            time.sleep(float(fault.split(":")[1]))
        if stub.delay:
            time.sleep(stub.delay)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        content = reply_for(prompt)
        self._send(200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                      "total_tokens": len(prompt.split()) + len(content.split())}})


class OpenAIStub:
    def __init__(self, port: int = 0, delay: float = 0.0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stub = self
        self.faults: list[str] = []
        self.delay = delay
        self.requests = 0
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self.faults.pop(0) if self.faults else None

    def __enter__(self) -> "OpenAIStub":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    with OpenAIStub(a.port, a.delay) as s:
        print(s.url, flush=True)
        threading.Event().wait()
