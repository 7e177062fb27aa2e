"""Aggregate decode tokens/s of `phiforge serve` with 16 concurrent streaming clients, against one stream in the same
run (continuous batching at work), and against the llama.cpp server on the same GGUF when one is available.

    python benchmarks/bench_serve.py                               # small-20m-shaped model made on the fly
    python benchmarks/bench_serve.py runs/sft/final --threads 2 --new-tokens 128
    python benchmarks/bench_serve.py MODEL --gguf model.gguf --llama-server ~/llama.cpp/build/bin/llama-server

The server runs in its own process (`python -m phiforge.serve`), the clients in this one (asyncio + httpx streaming
/v1/completions, greedy, ignore_eos so every stream makes exactly --new-tokens tokens). Aggregate tokens/s = all
completion tokens / wall time from the first request to the last [DONE]. One stream and --streams streams are
interleaved --repeats times; each takes its best. Last line: `bench_serve: R.RRx vs 1 stream (goal >= 4.0x)`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "The quick brown fox", "def add(a, b):", "Tom and Lily went to the park",
           "In a small village", "import torch", "The answer is", "Dear diary,"]


def make_model(folder: Path, preset: str) -> None:
    """A random model of `preset`'s shape with a BPE tokenizer trained on this repository's Python sources."""
    import dataclasses

    import torch

    from phiforge.checkpoint import build_model, save_hf_folder
    from phiforge.models import config_from_name
    from phiforge.tokenizer import train_bpe

    texts = [p.read_text(errors="replace") for p in sorted((ROOT / "phiforge").rglob("*.py"))]
    cfg = config_from_name(preset)
    tok = train_bpe(texts, vocab_size=min(cfg.vocab_size, 4096))
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                              pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_hf_folder(model.eval(), folder, tok)


def start_phiforge(model: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "phiforge.serve", model, "--port", "0", "--max-batch", str(args.streams),
           "--max-queue", str(args.streams), "--ctx-size", str(args.new_tokens + 64)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"phiforge serve exited with {proc.returncode}")
        m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("phiforge serve did not start in 300 s")


def start_llama(args) -> tuple[subprocess.Popen, str] | str:
    """The llama.cpp server on --gguf, or a reason why there is none."""
    exe = args.llama_server or shutil.which("llama-server")
    if not args.gguf:
        return "no --gguf given"
    if not exe or not Path(exe).exists():
        return "no llama-server binary (--llama-server or PATH)"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = args.streams * (args.new_tokens + 64)
    cmd = [exe, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(args.streams),
           "-c", str(ctx), "-cb"] + (["-t", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(url: str, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as h:
        while time.monotonic() < deadline:
            try:
                if (await h.get(url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


async def one_stream(h, url: str, model: str, prompt: str, n: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with h.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def run(url: str, model: str, streams: int, n: int) -> tuple[int, float]:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as h:
        t = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(h, url, model, PROMPTS[i % len(PROMPTS)], n)
                                        for i in range(streams)))
        return sum(counts), time.perf_counter() - t


def measure(url: str, model: str, args, label: str) -> tuple[float, float]:
    asyncio.run(wait_ready(url))
    asyncio.run(run(url, model, 2, 8))  # warm-up
    best1 = bestN = 0.0
    for r in range(args.repeats):
        tok1, s1 = asyncio.run(run(url, model, 1, args.new_tokens))
        tokN, sN = asyncio.run(run(url, model, args.streams, args.new_tokens))
        assert tok1 == args.new_tokens and tokN == args.streams * args.new_tokens, (tok1, tokN)
        best1, bestN = max(best1, tok1 / s1), max(bestN, tokN / sN)
        print(f"{label} repeat {r}: 1 stream {tok1 / s1:8.1f} tok/s | {args.streams} streams {tokN / sN:8.1f} tok/s "
              f"aggregate ({tokN} tokens in {sN:.2f} s)", flush=True)
    return best1, bestN


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: a random small-20m-shaped one)")
    ap.add_argument("--preset", default="small-20m", help="shape of the on-the-fly model")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    ap.add_argument("--gguf", default=None, help="the same model as GGUF, for the llama.cpp comparison")
    ap.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server")
    args = ap.parse_args()

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
        model = tmp.name
        make_model(Path(model), args.preset)
    proc, url = start_phiforge(model, args)
    try:
        one, many = measure(url, model, args, "phiforge")
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"phiforge serve: 1 stream {one:.1f} tok/s, {args.streams} streams {many:.1f} tok/s aggregate "
          f"(threads {args.threads or 'default'})")

    llama = start_llama(args)
    if isinstance(llama, str):
        print(f"llama.cpp server: unavailable ({llama})")
    else:
        lproc, lurl = llama
        try:
            _, lmany = measure(lurl, "gguf", args, "llama.cpp")
        finally:
            lproc.terminate()
            lproc.wait(60)
        print(f"llama.cpp server: {args.streams} streams {lmany:.1f} tok/s aggregate; "
              f"phiforge {many / lmany:.2f}x vs llama.cpp server")
    if tmp is not None:
        tmp.cleanup()
    print(f"bench_serve: {many / one:.2f}x vs 1 stream (goal >= 4.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
