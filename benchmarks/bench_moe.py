"""Phi-3.5-MoE-shaped CPU inference speed: a random-weight PhiMoE (16 experts, top-2) against transformers'
PhimoeForCausalLM on the same weights, and int4 against llama.cpp on the GGUF its own converter makes of them.

    python benchmarks/bench_moe.py                        # 2 threads, 4 layers, hidden 512, 16 experts
    python benchmarks/bench_moe.py --layers 2 --no-llama-cpp --reps 1

The weights are phiforge's init (seed 0), saved as an HF folder (Hub names) that transformers loads with
from_pretrained; both engines check that they decode the same greedy tokens. Decode is batch 1 after a
--prompt-token prompt (tokens/s over --decode greedy steps): ours through the engine's own calls, eager and
torch.compile'd as `phiforge generate --compile` runs it (bench_quant.measure), transformers' through `generate`
with a streamer that stamps each token (bench_generate.run_hf). Prompt tokens/s: one --prompt-token forward, logits
of the last token only, on both sides. int4: the same folder through llama.cpp's convert_hf_to_gguf.py (f32) and
llama-quantize Q4_0, run by llama-bench; ours quantized with phiforge's RTN int4 (symmetric, group 32: Q4_0's
format, the output matrix too: llama-quantize is told --output-tensor-type q4_0 where it would pick Q6_K; the
router stays float in both, as llama-quantize leaves ffn_gate_inp f32; the embedding, a row lookup, is Q4_0 in
theirs and float in ours). The llama.cpp rows need a build (scripts/build_llama_cpp.sh) and its sources (the
converter); without them they are skipped.
Each side reports the best of --reps runs, the engines alternating. Headline (last line): the compiled fp32 decode
ratio against transformers; the prompt and int4 ratios are the lines before it.
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import run_hf  # noqa: E402
from bench_quant import find_llama_cpp, llama_bench, measure  # noqa: E402

from phiforge.checkpoint import save_hf_folder  # noqa: E402
from phiforge.fast import prepare_for_inference  # noqa: E402
from phiforge.models import config_from_name  # noqa: E402
from phiforge.models.phimoe import PhiMoE  # noqa: E402
from phiforge.step import prefill  # noqa: E402


def build(args, folder: Path) -> tuple[PhiMoE, object]:
    """Our random model and transformers' PhimoeForCausalLM loaded from the folder we save it to."""
    from transformers import PhimoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars in the benchmark's output

    cfg = config_from_name("phi-3.5-moe", num_hidden_layers=args.layers, hidden_size=args.hidden,
                           intermediate_size=args.ffn, num_attention_heads=args.hidden // 64,
                           num_key_value_heads=args.hidden // 256, vocab_size=args.vocab,
                           max_position_embeddings=4096, original_max_position_embeddings=4096, rope_scaling=None,
                           sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ours = PhiMoE(cfg)
    ours.init_weights(seed=0)
    save_hf_folder(ours, folder)
    hf = PhimoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return prepare_for_inference(ours.eval()), hf


@torch.inference_mode()
def hf_prompt_tps(hf, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    hf(ids, use_cache=True, logits_to_keep=1)
    return ids.shape[1] / (time.perf_counter() - t0)


@torch.inference_mode()
def our_prompt_tps(model, ids: torch.Tensor) -> float:
    cache = model.make_cache(1, ids.shape[1], dtype=torch.float32)
    t0 = time.perf_counter()
    prefill(model, ids, torch.arange(ids.shape[1])[None], cache, 0)
    return ids.shape[1] / (time.perf_counter() - t0)


def active_floor_ms(model, iters: int = 20) -> float:
    """ms per token of the weight matmuls one decode token runs (each layer's q/k/v/o, router and 2 of its experts,
    and the LM head), as bench_generate.matmul_floor_ms does for a dense model: batch-1 decode is a weight stream,
    it cannot be faster than this. Experts 0 and 1 stand for the two a token picks."""
    lins = [model.lm_head]
    for block in model.model.layers:
        att, moe = block.self_attn, block.block_sparse_moe
        lins += [att.q_proj, att.k_proj, att.v_proj, att.o_proj, moe.gate]
        lins += [lin for e in moe.experts[:2] for lin in (e.w1, e.w3, e.w2)]
    xs = [torch.randn(1, m.in_features) for m in lins]
    with torch.inference_mode():
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                for m, x in zip(lins, xs):
                    m(x)
            best = min(best, (time.perf_counter() - t) / iters * 1e3)
    return best


def llama_cpp_q4_0(bin_dir: Path, folder: Path, tmp: Path, args) -> tuple[float, float]:
    """llama.cpp's converter on the folder (f32), llama-quantize Q4_0, llama-bench: (decode, prompt) tokens/s."""
    from phiforge.export.llama_cpp import run_converter, write_sentencepiece_tokenizer

    write_sentencepiece_tokenizer(folder, "The quick brown fox jumps over the lazy dog.\n" * 50)
    f32 = run_converter(folder, tmp / "moe-f32.gguf", "f32")
    q4 = tmp / "moe-q4_0.gguf"
    # --output-tensor-type q4_0: llama-quantize would give the output matrix Q6_K; ours is int4 like the rest
    res = subprocess.run([str(bin_dir / "llama-quantize"), "--output-tensor-type", "q4_0", str(f32), str(q4), "Q4_0",
                          str(args.threads)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-quantize failed: {res.stderr[-2000:]}")
    f32.unlink()
    print(f"llama.cpp Q4_0 (its converter + llama-quantize, {q4.stat().st_size / 2**20:.0f} MiB):", flush=True)
    return llama_bench(bin_dir, q4, args.threads, args.prompt, args.decode, args.reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024, help="per-expert FFN size")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-cpp", help="folder with llama-bench and llama-quantize (scripts/build_llama_cpp.sh)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    ours, hf = build(args, tmp / "hf")
    cfg = ours.config
    print(f"PhiMoE random weights: {args.layers} layers, hidden {args.hidden}, {cfg.num_local_experts} experts x FFN "
          f"{args.ffn}, top-2, vocab {args.vocab}, {cfg.num_params() / 1e6:.0f}M parameters fp32; {args.threads} "
          f"threads, torch {torch.__version__}; prompt {args.prompt} tokens, {args.decode} decode steps", flush=True)
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    # -- prompt: one forward of the whole prompt, both engines alternating, best of reps
    hf_prompt_tps(hf, ids[:, :16]), our_prompt_tps(ours, ids[:, :16])  # warm-up
    hp = up = 0.0
    for _ in range(max(args.reps, 5)):  # a few seconds each; the best of more runs is steadier on a shared machine
        hp = max(hp, hf_prompt_tps(hf, ids))
        up = max(up, our_prompt_tps(ours, ids))
    print(f"prompt ({args.prompt} tokens): phiforge {up:.0f} tok/s, transformers {hp:.0f} tok/s -> {up / hp:.2f}x",
          flush=True)

    # -- decode, batch 1: transformers' generate; ours eager and compiled (bench_quant.measure)
    prompt_ids = ids[0].tolist()
    _, hf_tps, hf_tokens = run_hf(hf, prompt_ids, 4)  # warm-up
    hd = 0.0
    for _ in range(args.reps):
        _, tps, hf_tokens = run_hf(hf, prompt_ids, args.decode)
        hd = max(hd, tps)
    print(f"transformers decode: {hd:.1f} tok/s", flush=True)
    with torch.inference_mode():  # the same greedy tokens as transformers (a sanity check of the shared weights)
        cache = ours.make_cache(1, args.prompt + args.decode, dtype=torch.float32)
        tok = prefill(ours, ids, torch.arange(args.prompt)[None], cache, 0).argmax(-1)
        our_tokens = [int(tok)]
        for i in range(args.decode - 1):
            p = torch.tensor([args.prompt + i])
            tok = ours(tok[:, None], p[:, None], cache=cache, cache_slots=p)[:, -1].argmax(-1)
            our_tokens.append(int(tok))
    same = our_tokens == hf_tokens
    print(f"greedy tokens identical to transformers: {same}", flush=True)
    print("phiforge eager:", flush=True)
    ed, _ = measure(ours, torch.float32, args.prompt, args.decode, reps=args.reps)
    print("phiforge, decode step torch.compile'd (phiforge generate --compile):", flush=True)
    cd, _ = measure(ours, torch.float32, args.prompt, args.decode, compile=True, reps=args.reps)
    torch._dynamo.reset()
    dec = max(ed, cd)
    print(f"decode: phiforge {dec:.1f} tok/s (eager {ed:.1f}, compiled {cd:.1f}), transformers {hd:.1f} tok/s -> "
          f"{dec / hd:.2f}x (eager {ed / hd:.2f}x)", flush=True)
    floor = active_floor_ms(ours)
    print(f"floor: the weight matmuls of one decode token alone take {floor:.2f} ms ({1e3 / floor:.0f} tok/s): at most "
          f"{1e3 / floor / hd:.2f}x over transformers here", flush=True)
    del hf
    gc.collect()

    # -- int4 against llama.cpp Q4_0 of the same weights
    llama_bin = None if args.no_llama_cpp else find_llama_cpp(args.llama_cpp)
    from phiforge.export.llama_cpp import converter_tree
    int4_ratio = None
    if llama_bin is None or converter_tree() is None:
        print("llama.cpp: no build or no converter sources (scripts/build_llama_cpp.sh); int4 row skipped")
    else:
        zdec, zpre = llama_cpp_q4_0(llama_bin, tmp / "hf", tmp, args)
        from phiforge.quant import quantize
        from phiforge.utils import set_module
        routers = {n: m for n, m in ours.named_modules() if n.endswith("block_sparse_moe.gate")}
        quantize(ours, bits=4, group_size=32, symmetric=True)
        for name, router in routers.items():  # float again, as llama-quantize leaves ffn_gate_inp f32
            set_module(ours, name, router)
        print("phiforge int4 (RTN, symmetric, group 32 = Q4_0's format), eager and compiled:", flush=True)
        qd, qp = measure(ours, torch.float32, args.prompt, args.decode, reps=args.reps)
        qcd, _ = measure(ours, torch.float32, args.prompt, args.decode, compile=True, reps=args.reps)
        torch._dynamo.reset()
        int4_ratio = max(qd, qcd) / zdec
        print(f"int4 decode: phiforge {max(qd, qcd):.1f} tok/s (eager {qd:.1f}), llama.cpp Q4_0 {zdec:.1f} tok/s -> "
              f"{int4_ratio:.2f}x; prompt {qp:.0f} vs {zpre:.0f} tok/s -> {qp / zpre:.2f}x", flush=True)
    print(f"prompt: {up / hp:.2f}x vs transformers (goal >= 1.5x)")
    if int4_ratio is not None:
        print(f"int4: {int4_ratio:.2f}x vs llama.cpp Q4_0 decode (goal >= 1.0x)")
    print(f"bench_moe: {dec / hd:.2f}x vs transformers decode (goal >= 3.0x)")


if __name__ == "__main__":
    main()
