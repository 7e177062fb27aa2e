"""Forward-pass tokens/s: phiforge vs transformers' Phi3ForCausalLM on the same ~20M-parameter weights, same run.

    python benchmarks/bench_forward.py [--batch 4 --seq 256 --reps 10 --threads 2]

Runs are interleaved (ours, theirs, ours, ...) so both see the same machine noise; the median is reported.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small-20m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Phi3ForCausalLM

    from phiforge import load
    from phiforge.checkpoint import save_hf_folder

    dtype = getattr(torch, args.dtype)
    ours, _ = load(args.preset, seed=0)
    with tempfile.TemporaryDirectory() as d:
        save_hf_folder(ours, d)
        theirs = Phi3ForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=dtype).eval()
    ours = ours.to(dtype).eval()
    n = sum(p.numel() for p in ours.parameters())
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    with torch.inference_mode():
        err = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
        for _ in range(2):  # warm-up
            ours(ids), theirs(ids)
        t_ours, t_theirs = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter(); ours(ids); t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); theirs(ids).logits; t_theirs.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    ours_tps, theirs_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)
    print(f"model: {args.preset} ({n / 1e6:.1f}M params), {args.dtype}, batch {args.batch} x {args.seq}, "
          f"{args.threads} threads, max |logit diff| {err:.1e}")
    print(f"phiforge:     {ours_tps:10.0f} tokens/s")
    print(f"transformers: {theirs_tps:10.0f} tokens/s")
    print(f"bench_forward: {ours_tps / theirs_tps:.2f}x vs transformers (goal >= 1.0x)")


if __name__ == "__main__":
    main()
