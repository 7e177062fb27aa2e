"""Decode tokens/s and time-to-first-token of phiforge.generate against transformers' `generate`, same weights, same
run, greedy, batch 1, CPU.

    python benchmarks/bench_generate.py                  # (a) small-20m fp32 + (b) phi-3-mini-shaped bf16
    python benchmarks/bench_generate.py --skip-large --threads 2 --new-tokens 128

(a) the ~20M-parameter preset small-20m in fp32; (b) a phi-3-mini-shaped model (3.8B parameters) in bf16 with random
weights made on the fly (~7.6 GB, skipped with a message when RAM is short). Both engines use the same weight tensors
(shared storage). Each measurement is the best of --repeats runs, the two engines interleaved so that machine load
hits both alike. Both are timed per token inside one run (transformers through a streamer that records arrival
times): TTFT = first token's arrival - call start; decode tokens/s = (N - 1) / (last arrival - first arrival).
(a) runs our engine eager and with the torch.compile'd decode step (--no-compile skips it); the last line is the
better (a) decode ratio: `bench_generate: R.RRx vs transformers (goal >= 3.0x)`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phiforge.checkpoint import build_model  # noqa: E402
from phiforge.fast import prepare_for_inference  # noqa: E402
from phiforge.generate import stream_generate  # noqa: E402
from phiforge.models import config_from_name  # noqa: E402
from phiforge.models.phi3 import Phi3Config  # noqa: E402
from phiforge.sample import GenerationConfig  # noqa: E402


def hf_twin(cfg: Phi3Config, dtype: torch.dtype, fill_seed: int = 0):
    """transformers' Phi3ForCausalLM with cheap random weights, and our model sharing the very same tensors."""
    from transformers import Phi3Config as HFConfig, Phi3ForCausalLM

    d = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    if d["sliding_window"] is not None:
        d["sliding_window"] += 1  # transformers 5 window semantics (tests/conftest.py)
    hf_cfg = HFConfig(**d)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Phi3ForCausalLM(hf_cfg).to(dtype)  # no memory yet: fp32 would never be materialised
    hf = hf.to_empty(device="cpu")
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # buffers were left empty on meta
    gen = torch.Generator().manual_seed(fill_seed)
    block = (torch.randn(1 << 20, generator=gen) * 0.02).to(dtype)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            off = int(torch.randint(0, 1 << 19, (1,), generator=gen))
            for i in range(0, flat.numel(), 1 << 19):  # tile a random block (fast even for 3.8B parameters)
                n = min(1 << 19, flat.numel() - i)
                flat[i:i + n] = block[off:off + n]
    hf.eval()
    ours = build_model(cfg, dtype, init=False)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary" not in k}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return hf, prepare_for_inference(ours.eval())  # the load-time kernel step `phiforge generate` takes


class _Clock:
    """A transformers streamer that only records when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(hf, ids, n):
    """(ttft seconds, decode tokens/s, tokens) of one transformers generate call."""
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=clock)
    stamps = clock.times[1:]  # one per generated token
    assert out.shape[1] == len(ids) + n and len(stamps) == n
    return stamps[0] - t0, (n - 1) / (stamps[-1] - stamps[0]), out[0, len(ids):].tolist()


def run_ours(model, ids, n, compile_):
    t0 = time.perf_counter()
    stamps, tokens = [], []
    for ev in stream_generate(model, None, ids, GenerationConfig(max_new_tokens=n, stop_ids=()), compile=compile_):
        stamps.append(time.perf_counter())
        tokens.append(ev.token_id)
    assert len(tokens) == n
    return stamps[0] - t0, (n - 1) / (stamps[-1] - stamps[0]), tokens


def measure(name, hf, ours, prompt_len, new_tokens, repeats, compile_):
    """Best of `repeats` runs, the engines alternating; TTFT and decode rate are each read from one whole run."""
    vocab = ours.config.vocab_size
    ids = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if repeats > 1:  # warm up (allocator, oneDNN kernels, torch.compile); the large model has no time for it
        run_hf(hf, ids, new_tokens), run_ours(ours, ids, new_tokens, compile_)
    hf_ttft = us_ttft = 1e9
    hf_tps = us_tps = 0.0
    same = True
    floor = 1e9
    for _ in range(repeats):
        floor = min(floor, matmul_floor_ms(ours)) if repeats > 1 else floor
        a, b, hf_tokens = run_hf(hf, ids, new_tokens)
        hf_ttft, hf_tps = min(hf_ttft, a), max(hf_tps, b)
        a, b, our_tokens = run_ours(ours, ids, new_tokens, compile_)
        us_ttft, us_tps = min(us_ttft, a), max(us_tps, b)
        same &= hf_tokens == our_tokens
    name += ", torch.compile" if compile_ else ""
    print(f"({name}) decode: phiforge {us_tps:.3g} tok/s, transformers {hf_tps:.3g} tok/s -> {us_tps / hf_tps:.2f}x; "
          f"time-to-first-token ({prompt_len}-token prompt): phiforge {us_ttft * 1e3:.1f} ms, transformers "
          f"{hf_ttft * 1e3:.1f} ms -> {hf_ttft / us_ttft:.2f}x; greedy tokens identical: {same}", flush=True)
    if floor < 1e9:
        print(f"({name}) floor: the weight matmuls alone take {floor:.2f} ms/token ({1e3 / floor:.0f} tok/s; batch-1 "
              f"decode is memory-bandwidth bound): at most {1e3 / floor / hf_tps:.2f}x over transformers here",
              flush=True)
    return us_tps / hf_tps


def matmul_floor_ms(model, iters: int = 10) -> float:
    """ms per token of the weight matmuls alone (every Linear once on one token): batch-1 decode cannot be faster."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears]
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(iters):
            for m, x in zip(linears, xs):
                m(x)
    return (time.perf_counter() - t) / iters * 1e3


def mem_available_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-new-tokens", type=int, default=4)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the run with torch.compile'd decode")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}", flush=True)

    hf, ours = hf_twin(config_from_name("small-20m"), torch.float32)
    print(f"(a) small-20m fp32, {ours.num_params() / 1e6:.1f}M parameters, greedy, {args.new_tokens} new tokens",
          flush=True)
    ratio_a = measure("a", hf, ours, args.prompt_len, args.new_tokens, args.repeats, False)
    if not args.no_compile:
        ratio_a = max(ratio_a, measure("a", hf, ours, args.prompt_len, args.new_tokens, args.repeats, True))
    del hf, ours

    need = 7.6 * 1.25
    if args.skip_large:
        print("(b) phi-3-mini-shaped bf16: skipped (--skip-large)")
    elif mem_available_gb() < need:
        print(f"(b) phi-3-mini-shaped bf16: skipped, needs ~{need:.1f} GB of free RAM, "
              f"{mem_available_gb():.1f} GB available")
    else:
        t = time.perf_counter()
        hf, ours = hf_twin(config_from_name("phi-3-mini-4k"), torch.bfloat16)
        print(f"(b) phi-3-mini-shaped bf16, {ours.num_params() / 1e9:.2f}B parameters (built in "
              f"{time.perf_counter() - t:.0f} s), greedy, {args.large_new_tokens} new tokens", flush=True)
        measure("b", hf, ours, 32, args.large_new_tokens, 1, False)
        del hf, ours
    print(f"bench_generate: {ratio_a:.2f}x vs transformers (goal >= 3.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
