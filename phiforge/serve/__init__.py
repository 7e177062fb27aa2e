"""`phiforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

    phiforge serve runs/sft/final --host 127.0.0.1 --port 8000
    phiforge serve microsoft/Phi-3-mini-4k-instruct --dtype bfloat16 --max-batch 16 --api-key secret
    python -m phiforge.serve runs/sft/final --port 0          # any free port (printed at start-up)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")

In-process (tests, data recipes): `url, stop = start_background("runs/sft/final")`; `OpenAI(base_url=url + "/v1")`.

Layout: `batch.py` is continuous batching (`BatchState`: rows of one KV cache, on the model calls of
phiforge.generate and the sampling of phiforge.sample, as `phiforge generate` and `phiforge chat` use them);
`scheduler.py` runs concurrent requests on one BatchState; `api.py` holds the routes, schemas, limits and error
bodies.
See docs/serve.md.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from phiforge.utils import ArgumentParser, UserError

__all__ = ["main", "start_background", "create_app", "Server"]


def __getattr__(name):  # keep `import phiforge.serve` light: FastAPI is imported when it is used
    if name in ("create_app", "Server"):
        from phiforge.serve import api
        return getattr(api, name)
    raise AttributeError(name)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0 = any free port)") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn(server, sock_timeout: float, log_level: str):
    import uvicorn

    from phiforge.serve.api import create_app

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGINT/SIGTERM: refuse new work (503), let running requests finish, then exit 0 (uvicorn would
            # re-raise the signal afterwards); a second SIGINT forces the exit.
            server.sched.close()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    # our own request log (Server.record: method, path, status, tokens, ms) replaces uvicorn's access log
    config = uvicorn.Config(create_app(server), http="h11", lifespan="on", log_level=log_level,
                            timeout_graceful_shutdown=sock_timeout, access_log=False)
    return Uvicorn(config)


def _make_server(model, tokenizer, model_id, **options):
    from phiforge.fast import prepare_for_inference
    from phiforge.serve.api import Server

    if tokenizer is None:
        raise UserError(f"{model_id} has no tokenizer; the server needs one (save it with the model)")
    return Server(prepare_for_inference(model.eval()), tokenizer, model_id, **options)


def start_background(model, port: int = 0, host: str = "127.0.0.1", model_id: str | None = None,
                     dtype: str = "float32", device: str = "cpu", shutdown_timeout: float = 10.0,
                     log_level: str = "warning", **options):
    """Start a server in a background thread of this process. `model`: a model folder, or a (model, tokenizer)
    pair. options: max_batch, context, max_queue, max_body_bytes, api_key, cors_origins. Returns (url, stop): url is
    "http://host:port" (OpenAI base_url = url + "/v1"); stop() shuts down gracefully (running requests finish)."""
    if isinstance(model, (str, os.PathLike)):
        from phiforge import load

        model_id = model_id or str(model)
        model, tokenizer = load(str(model), dtype=dtype, device=device)
    else:
        model, tokenizer = model
        model_id = model_id or "phiforge"
    server = _make_server(model, tokenizer, model_id, **options)
    sock = _bind(host, port)
    uv = _uvicorn(server, shutdown_timeout, log_level)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="phiforge-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not uv.started:
        uv.should_exit = True
        sock.close()
        raise RuntimeError("phiforge serve did not start")
    port = sock.getsockname()[1]

    def stop(timeout: float = 30.0) -> None:
        server.sched.close()
        uv.should_exit = True
        thread.join(timeout)
        server.sched.stop()
        sock.close()

    stop.server = server  # for tests: health counters, the scheduler
    return f"http://{host}:{port}", stop


def main(argv: list[str] | None = None) -> int:
    import torch

    from phiforge import load
    from phiforge.generate import add_model_args

    ap = ArgumentParser(prog="phiforge serve", description="OpenAI-compatible server and chat page (/): /v1/models, "
                                 "/v1/chat/completions, /v1/completions, /health, /metrics (Prometheus).")
    add_model_args(ap)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 = any free port")
    ap.add_argument("--model-name", default=None, help="the model id clients send (default: the MODEL argument)")
    ap.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for a free row; beyond: HTTP 429")
    ap.add_argument("--ctx-size", type=int, default=None,
                    help="tokens per sequence, prompt + completion (default: the model's, at most 4096)")
    ap.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get HTTP 413")
    ap.add_argument("--api-key", default=os.environ.get("PHIFORGE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $PHIFORGE_API_KEY; none = open)")
    ap.add_argument("--cors-origins", default=None,
                    help="comma-separated origins whose pages may call the API from a browser, e.g. "
                         "'http://localhost:3000' ('*' = any; default: none, so only the server's own chat page)")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGINT/SIGTERM, seconds running requests get to finish")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--no-request-log", action="store_true",
                    help="do not print one line per request (method, path, status, tokens, ms) to stderr")
    args = ap.parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 0 or (args.ctx_size is not None and args.ctx_size < 2):
        raise UserError("need --max-batch >= 1, --max-queue >= 0 and --ctx-size >= 2")
    sock = _bind(args.host, args.port)  # before loading: a busy port fails fast
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
        server = _make_server(model, tokenizer, args.model_name or args.model, max_batch=args.max_batch,
                              context=args.ctx_size, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                              api_key=args.api_key, compile=args.compile, access_log=not args.no_request_log,
                              cors_origins=[o.strip() for o in (args.cors_origins or "").split(",") if o.strip()])
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("phiforge serve: warning: listening beyond loopback without --api-key", file=sys.stderr)
    mib = server.sched.state.cache_bytes() / 2**20
    print(f"phiforge serve: {server.model_id!r} on http://{args.host}:{port}/v1, chat page at "
          f"http://{args.host}:{port}/ (max batch {args.max_batch}, "
          f"context {server.context}, queue {args.max_queue}, KV cache {mib:.0f} MiB)", file=sys.stderr, flush=True)
    _uvicorn(server, args.shutdown_timeout, args.log_level).run(sockets=[sock])
    print("phiforge serve: stopped", file=sys.stderr)
    return 0
