"""The OpenAI-compatible HTTP API: request schemas, validation and limits, error bodies, SSE streaming.

Endpoints (the chat page at / and CORS are in page.py): GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions.
Reference: the OpenAI API reference (chat/completions, completions, error objects, streaming chunk objects).
Errors are OpenAI error objects: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from phiforge.sample import GenerationConfig
from phiforge.serve.scheduler import Chunk, Closing, Job, QueueFull, Scheduler
from phiforge.utils import UserError

DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read (and dropped) so the client sees the 413
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


# ----------------------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------------------------------------------
# Request schemas (strict types: "10" is not an integer; unknown fields are ignored)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (vLLM / llama.cpp spellings)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


# ----------------------------------------------------------------------------------------------------------------
# The application


class Server:
    """What the routes need: the scheduler, the tokenizer and the limits."""

    def __init__(self, model, tokenizer, model_id: str, max_batch: int = 8, context: int | None = None,
                 max_queue: int = 64, max_body_bytes: int = 4 << 20, api_key: str | None = None,
                 compile: bool = False, access_log: bool = False, cors_origins: list[str] | None = None):
        limit = model.config.max_position_embeddings
        self.context = min(int(context or min(limit, 4096)), limit)
        if max_batch < 1 or max_queue < 0 or self.context < 2:
            raise UserError("need --max-batch >= 1, --max-queue >= 0 and a context of at least 2 tokens")
        self.tok, self.model_id, self.api_key = tokenizer, model_id, api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.vocab_size = model.config.vocab_size
        self.sched = Scheduler(model, tokenizer, max_batch=max_batch, max_len=self.context, max_queue=max_queue,
                               compile=compile)
        self.access_log = access_log
        self.cors_origins = list(cors_origins or [])  # browser pages on these origins may call the API (page.py)
        self.counts: dict[tuple, int] = {}  # (method, path, status) -> requests, for /metrics
        self.seconds: dict[str, list] = {}  # path -> [sum of seconds, count]

    # -- the request log and /metrics ------------------------------------------------------------------------------
    def record(self, method: str, path: str, status: int, tokens: int | None, seconds: float) -> None:
        """One finished request: counted for /metrics and, with access_log, one line on stderr."""
        # a bounded set of labels for /metrics: any other path (a scan, a typo) is "other"
        path = path if path in KNOWN_PATHS else ("/v1/models/{id}" if path.startswith("/v1/models/") else
                                                 "/static/{name}" if path.startswith("/static/") else "other")
        key = (method, path, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        acc = self.seconds.setdefault(path, [0.0, 0])
        acc[0] += seconds
        acc[1] += 1
        if self.access_log:
            print(f"phiforge serve: {method} {path} {status} tokens={tokens if tokens is not None else '-'} "
                  f"{seconds * 1000:.0f}ms", file=sys.stderr, flush=True)

    def metrics(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        h = self.sched.health()
        out = ["# HELP phiforge_requests_total HTTP requests by method, path and status.",
               "# TYPE phiforge_requests_total counter"]
        out += [f'phiforge_requests_total{{method="{m}",path="{p}",status="{st}"}} {n}'
                for (m, p, st), n in sorted(self.counts.items())]
        out += ["# HELP phiforge_request_duration_seconds Time from request to the end of the response.",
                "# TYPE phiforge_request_duration_seconds summary"]
        for p, (total, n) in sorted(self.seconds.items()):
            out += [f'phiforge_request_duration_seconds_sum{{path="{p}"}} {total:.6f}',
                    f'phiforge_request_duration_seconds_count{{path="{p}"}} {n}']
        for name, key, kind, help_ in (
                ("generated_tokens_total", "tokens", "counter", "Tokens generated."),
                ("generations_total", "requests", "counter", "Sequences generated (one per prompt)."),
                ("generations_cancelled_total", "cancelled", "counter", "Sequences cancelled (client gone)."),
                ("generation_errors_total", "errors", "counter", "Sequences ended by an error."),
                ("running", "running", "gauge", "Sequences being decoded now."),
                ("waiting", "waiting", "gauge", "Sequences waiting for a free row."),
                ("max_batch", "max_batch", "gauge", "Rows decoded together (--max-batch).")):
            out += [f"# HELP phiforge_{name} {help_}", f"# TYPE phiforge_{name} {kind}", f"phiforge_{name} {h[key]}"]
        return "\n".join(out) + "\n"

    # -- request checks ------------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def read_json(self, request: Request, schema):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            if int(size) <= DRAIN_LIMIT:
                async for _ in request.stream():
                    pass
            raise ApiError(413, f"request body of {int(size)} bytes exceeds the limit of {self.max_body_bytes} "
                                "bytes (--max-body-bytes)", "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes "
                                    "(--max-body-bytes)", "request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        except RecursionError:  # json.loads recurses per nesting level: `{"a":` x 5000 is a bad request, not a 500
            raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        try:
            req = schema.model_validate(data)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ApiError(422, f"{loc}: {err['msg']} (got {_short(err.get('input'))!r})"
                           + (f" and {e.error_count() - 1} more error(s)" if e.error_count() > 1 else ""),
                           "invalid_value", loc) from None
        if req.model is not None and req.model != self.model_id:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model_id!r}",
                           "model_not_found", "model")
        return req

    def config(self, req: Sampling, prompt_len: int, max_tokens: int | None, default: int | None,
               notices: list[str] | None = None) -> GenerationConfig | None:
        """GenerationConfig for one prompt; None for max_tokens 0. A max_tokens beyond the context is capped at it
        (as llama.cpp's server and `phiforge generate` do; the finish_reason is then "length") and a notice is
        appended to `notices`; a prompt that leaves no room is an error."""
        room = self.context - prompt_len
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty", "invalid_prompt", "prompt")
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; this server's context is {self.context} tokens "
                                "(prompt + max_tokens). Shorten the prompt.", "context_length_exceeded", "messages")
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
        if max_tokens > room:
            if notices is not None:
                notices.append(f"max_tokens {max_tokens} capped at {room}: the prompt uses {prompt_len} of the "
                               f"context of {self.context} tokens")
            max_tokens = room
        if max_tokens == 0:
            return None
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, "stop must be up to 16 non-empty strings", "invalid_value", "stop")
        extra = []
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise ApiError(400, "logit_bias keys must be token ids", "invalid_value", "logit_bias") from None
            if any(not 0 <= k < self.vocab_size for k in bias) or any(abs(v) > 100 for v in bias.values()):
                raise ApiError(400, f"logit_bias: token ids must be in [0, {self.vocab_size}) and values in "
                                    "[-100, 100]", "invalid_value", "logit_bias")
            extra.append(_bias_processor(bias))
        top_p, top_k = (1.0, 1) if req.top_p == 0 else (req.top_p if req.top_p is not None else 1.0, req.top_k)
        return GenerationConfig(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=top_k, top_p=top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop_ids=() if req.ignore_eos else None, stop_strings=tuple(stops), extra_processors=tuple(extra))

    def check_ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                           "invalid_prompt", "prompt")
        return ids

    def token_str(self, i: int) -> str:
        return self.tok.decode([i])

    # -- running jobs --------------------------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        try:
            self.sched.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full") from None
        except Closing as e:
            raise ApiError(503, str(e), "shutting_down") from None

    async def chunks(self, jobs: list[Job], request: Request | None = None):
        """Yield the Chunks of `jobs` as they come; cancels them when the consumer goes away (client disconnect)."""
        queue, left, checked = jobs[0].queue, len(jobs), time.monotonic()
        try:
            while left:
                if request is not None and time.monotonic() - checked > 0.5:  # non-streaming: poll the client
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    chunk = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if chunk.error is not None:
                    raise ApiError(503 if "shutting down" in chunk.error else 500, chunk.error,
                                   "shutting_down" if "shutting down" in chunk.error else "generation_failed")
                if chunk.finish_reason is not None:
                    left -= 1
                yield chunk
        finally:
            self.sched.cancel(jobs)  # no-op for finished jobs


def _bias_processor(bias: dict[int, float]):
    ids, values = list(bias), list(bias.values())

    def add_bias(logits, context_counts, generated_counts):
        logits = logits.clone()
        logits[..., ids] += logits.new_tensor(values)
        return logits

    return add_bias


def _added_positions(tok, ids: list[int]) -> set[int]:
    """Positions of the special tokens that tok.encode(text, add_special_tokens=True) put around the text."""
    n = len(ids)
    return set(range(int(tok.add_bos_token))) | set(range(n - int(tok.add_eos_token), n))


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _short(value, n: int = 80) -> str:
    try:
        return str(value)[:n]
    except RecursionError:  # a deeply nested value that still parsed
        return "(a deeply nested value)"


def _notice_headers(notices: list[str]) -> dict:
    """A capped request still succeeds; the header (and the server's log) says what was changed."""
    return {"X-Phiforge-Notice": "; ".join(notices)} if notices else {}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequestLog:
    """ASGI middleware: times every request and hands (method, path, status, completion tokens, seconds) to
    Server.record once the response has been sent. Pure ASGI, not BaseHTTPMiddleware, so streaming and the
    disconnect detection of the routes are untouched."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})  # request.state: the routes put "tokens" there

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.server.record(scope["method"], scope["path"], status[0], state.get("tokens"),
                               time.perf_counter() - t0)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.sched.start()
        yield
        server.sched.stop()

    app = FastAPI(title="phiforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code).response()

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").response()

    app.add_middleware(RequestLog, server=server)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        status = "shutting_down" if server.sched.closing else "ok"
        return JSONResponse({"status": status, "model": server.model_id, **server.sched.health()},
                            status_code=503 if server.sched.closing else 200)

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "phiforge",
                "max_model_len": server.context}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_auth(request)
        if model_id != server.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist", "model_not_found", "model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.check_auth(request)
        req: ChatRequest = await server.read_json(request, ChatRequest)
        if req.tools or (req.response_format or {}).get("type", "text") != "text":
            raise ApiError(400, "tools and response_format are not supported by phiforge serve", "unsupported")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content or [])} for m in req.messages]
        try:
            ids = server.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except UserError as e:
            raise ApiError(400, str(e), "invalid_messages", "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        notices: list[str] = []
        cfg = server.config(req, len(ids), max_tokens, None, notices)
        headers = _notice_headers(notices)
        k = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(ids, cfg, asyncio.Queue(), asyncio.get_running_loop(), logprobs=k)
        server.submit([job])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                "system_fingerprint": None}

        def lp_entries(chunks: list[Chunk]) -> list[dict]:
            out = []
            for c in chunks:
                s = server.token_str(c.token_id)
                top = [{"token": server.token_str(i), "logprob": v, "bytes": list(server.token_str(i).encode())}
                       for i, v in c.top or []]
                out.append({"token": s, "logprob": c.logprob, "bytes": list(s.encode()), "top_logprobs": top})
            return out

        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage

            async def events():
                first = {"role": "assistant", "content": ""}
                yield _sse({**head, "choices": [{"index": 0, "delta": first, "logprobs": None, "finish_reason": None}],
                            **({"usage": None} if usage else {})})
                held, n = [], 0
                try:
                    async for c in server.chunks([job]):
                        if c.token_id is not None:
                            n += 1
                            held.append(c)
                            request.state.tokens = n  # for the request log
                        if not c.text and c.finish_reason is None:
                            continue
                        lps = {"content": lp_entries(held)} if k is not None else None
                        held = []
                        delta = {"content": c.text} if c.text else {}
                        if c.text:
                            yield _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": lps,
                                                             "finish_reason": None}],
                                        **({"usage": None} if usage else {})})
                            lps = None
                        if c.finish_reason is not None:
                            yield _sse({**head, "choices": [{"index": 0, "delta": {}, "logprobs": lps,
                                                             "finish_reason": c.finish_reason}],
                                        **({"usage": None} if usage else {})})
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(len(ids), n)})
                except ApiError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

        text, finish, got = [], None, []
        async for c in server.chunks([job], request):
            text.append(c.text)
            finish = c.finish_reason or finish
            if c.token_id is not None:
                got.append(c)
        request.state.tokens = len(got)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": server.model_id,
                             "system_fingerprint": None,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                          "logprobs": {"content": lp_entries(got)} if k is not None else None,
                                          "finish_reason": finish or "length"}],
                             "usage": _usage(len(ids), len(got))}, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_auth(request)
        req: CompletionRequest = await server.read_json(request, CompletionRequest)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "unsupported", "suffix")
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise ApiError(400, "the prompt is empty", "invalid_prompt", "prompt")
        # text prompts get the special tokens the tokenizer adds (Phi-3's <s>), as `tokenizer(prompt)` in vLLM
        prompts = [server.check_ids(x) if isinstance(x, list) else server.tok.encode(x, add_special_tokens=True)
                   for x in p]
        texts = [x if isinstance(x, str) else server.tok.decode(ids) for x, ids in zip(p, prompts)]
        # echo: those added tokens are not in the echoed text, so they take no room in text_offset
        added = [_added_positions(server.tok, ids) if isinstance(x, str) else set() for x, ids in zip(p, prompts)]
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        notices: list[str] = []
        jobs = [Job(ids, server.config(req, len(ids), req.max_tokens, 16, notices), queue, loop, index=i,
                    logprobs=req.logprobs, echo=req.echo and req.logprobs is not None)
                for i, ids in enumerate(prompts)]
        server.submit(jobs)
        headers = _notice_headers(notices)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                "system_fingerprint": None}

        class Logprobs:  # OpenAI legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset
            def __init__(self, offset: int):
                self.d = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                self.offset = offset

            def add(self, token_id, logprob, top, in_text: bool = True):
                s = server.token_str(token_id)
                self.d["tokens"].append(s)
                self.d["token_logprobs"].append(logprob)
                self.d["top_logprobs"].append(None if top is None else
                                              {server.token_str(i): v for i, v in top})
                self.d["text_offset"].append(self.offset)
                self.offset += len(s) if in_text else 0

        def chunk_logprobs(c: Chunk, lp: "Logprobs | None"):
            if lp is None:
                return None
            if c.prompt_logprobs is not None:
                for k, (t, v, top) in enumerate(c.prompt_logprobs):
                    lp.add(t, v, top if v is not None else None, k not in added[c.index])
            if c.token_id is not None:
                lp.add(c.token_id, c.logprob, c.top if req.logprobs else None)
            return lp.d

        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage

            async def events():
                counts = [0] * len(jobs)
                lps = [Logprobs(0 if req.echo else len(t)) if req.logprobs is not None else None for t in texts]
                try:
                    if req.echo:
                        for i, t in enumerate(texts):
                            if req.logprobs is None:
                                yield _sse({**head, "choices": [{"text": t, "index": i, "logprobs": None,
                                                                 "finish_reason": None}]})
                    async for c in server.chunks(jobs):
                        if c.token_id is not None:
                            counts[c.index] += 1
                            request.state.tokens = sum(counts)  # for the request log
                        if lps[c.index] is not None:
                            lps[c.index] = Logprobs(lps[c.index].offset)  # each chunk carries its own tokens
                        lp = chunk_logprobs(c, lps[c.index])
                        text = texts[c.index] if c.prompt_logprobs is not None else c.text
                        if text or c.finish_reason is not None or lp is not None:
                            yield _sse({**head, "choices": [{"text": text, "index": c.index, "logprobs": lp,
                                                             "finish_reason": c.finish_reason}],
                                        **({"usage": None} if usage else {})})
                    if usage:
                        yield _sse({**head, "choices": [],
                                    "usage": _usage(sum(map(len, prompts)), sum(counts))})
                except ApiError as e:
                    yield _sse(e.body())
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

        text = [[t] if req.echo else [] for t in texts]
        finish: list[str | None] = [None] * len(jobs)
        counts = [0] * len(jobs)
        lps = [Logprobs(0 if req.echo else len(texts[i])) if req.logprobs is not None else None
               for i in range(len(jobs))]
        async for c in server.chunks(jobs, request):
            text[c.index].append(c.text)
            finish[c.index] = c.finish_reason or finish[c.index]
            chunk_logprobs(c, lps[c.index])
            if c.token_id is not None:
                counts[c.index] += 1
        request.state.tokens = sum(counts)
        return JSONResponse({**head, "choices": [{"text": "".join(text[i]), "index": i,
                                                  "logprobs": lps[i].d if lps[i] is not None else None,
                                                  "finish_reason": finish[i] or "length"} for i in range(len(jobs))],
                             "usage": _usage(sum(map(len, prompts)), sum(counts))}, headers=headers)

    from phiforge.serve.page import add_page

    add_page(app, server.cors_origins)  # the chat page at / and CORS: browser concerns live in page.py
    return app
