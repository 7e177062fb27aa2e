"""Training throughput: phiforge's pretrain step against transformers' Phi3ForCausalLM doing the same steps
(same dimensions, batch, data, AdamW settings, fp32 CPU by default), measured in the same process, interleaved.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py
    python benchmarks/bench_train.py --no-compile     # eager phiforge only

Measured: phiforge eager, phiforge with torch.compile (`phiforge pretrain --compile true`) and transformers
(eager, sdpa), once per precision: fp32, then bf16 autocast (`--dtype bf16`: fp32 weights and optimizer, bf16
matmuls; the precision the Phi-3 models were trained in), each side at the same precision. The last line reports
phiforge's fastest configuration against transformers at the same precision: bf16 with torch.compile, unless
--dtypes or --no-compile say otherwise; the lines before it give every other ratio, fp32 included.

The step is what `phiforge pretrain` runs: forward with the LM head fused into the loss
(phiforge.models.loss.linear_cross_entropy), backward, gradient
clipping, AdamW from phiforge.train.schedule.make_optimizer. The reference gets the same optimizer and the same
loss formula (its logits through phiforge.models.loss.cross_entropy = F.cross_entropy).
Last line: `bench_train: <ratio>x vs transformers (goal >= 1.2x)`, ratio = phiforge tokens/s / transformers'.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phiforge.checkpoint import build_model  # noqa: E402
from phiforge.models import config_from_name  # noqa: E402
from phiforge.models.phi3 import Phi3Config  # noqa: E402
from phiforge.models.loss import cross_entropy  # noqa: E402
from phiforge.train.schedule import make_optimizer  # noqa: E402


def hf_model(cfg: Phi3Config, attn: str):
    from transformers import Phi3Config as HFConfig
    from transformers import Phi3ForCausalLM
    d = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    hf_cfg = HFConfig(**d)
    hf_cfg._attn_implementation = attn
    return Phi3ForCausalLM(hf_cfg).train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-20m")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement (eager only)")
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa or eager)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16",
                    help="comma-separated precisions, measured in turn (bf16 = autocast, as pretrain --dtype bf16)")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        ap.error(f"--dtypes takes fp32 and/or bf16, comma-separated (got {args.dtypes!r})")
    ratios = {}
    for dtype in dtypes:
        tps = measure(args, dtype)
        for name in tps:
            if name != "transformers":
                ratios[f"{name} {dtype}"] = tps[name] / tps["transformers"]
    for name, r in ratios.items():
        print(f"{name}: {r:.2f}x vs transformers {name.split()[-1]}")
    best = max(ratios, key=lambda n: ("compile" in n, n.endswith("bf16")))  # compiled, bf16 when measured
    # the last line: phiforge's fastest training configuration against transformers at the same precision
    print(f"best: {best}")
    print(f"bench_train: {ratios[best]:.2f}x vs transformers {best.split()[-1]} (goal >= 1.2x)")
    return 0


def measure(args, dtype: str) -> dict[str, float]:
    """Median tokens/s of each runner at one precision."""

    cfg = config_from_name(args.preset, 
        hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 // 64 * 64), num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 1024), original_max_position_embeddings=max(args.seq, 1024))
    torch.manual_seed(0)
    ours = build_model(cfg, init=False)
    ours.init_weights(seed=0)
    dev = torch.device(args.device)
    ours.to(dev).train()
    ref = hf_model(cfg, args.attn).to(dev)
    ref.load_state_dict(ours.state_dict(), strict=False)  # same starting point
    opt_ours, opt_ref = make_optimizer(ours, 1e-4), make_optimizer(ref, 1e-4)
    compiled = None if args.no_compile else torch.compile(ours)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev) for _ in range(4)]
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step_ours(b, fwd=ours):
        with amp():
            loss = fwd(b[:, :-1], targets=b[:, 1:])  # as pretrain: the LM head fused into the loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_ref(b):
        # labels are the shifted targets: transformers' loss shifts internally, so pass inputs and targets aligned
        with amp():
            logits = ref(input_ids=b[:, :-1]).logits
        loss = cross_entropy(logits, b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss.item()

    with torch.no_grad():  # same computation before timing anything
        diff = (ours(batches[0][:, :-1]) - ref(input_ids=batches[0][:, :-1]).logits).abs().max().item()
    runners = {"phiforge": step_ours, "transformers": step_ref}
    if compiled is not None:
        runners["phiforge+compile"] = lambda b: step_ours(b, compiled)
    for i in range(2):  # warm-up (and compilation)
        for fn in runners.values():
            fn(batches[i])
    tokens = args.batch * args.seq * args.steps
    speeds = {name: [] for name in runners}
    for r in range(args.rounds):  # interleaved, order rotated each round, so load drifts hit all alike
        order = list(runners.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, fn in order:
            sync()
            t0 = time.perf_counter()
            for s in range(args.steps):
                fn(batches[s % len(batches)])
            sync()
            speeds[name].append(tokens / (time.perf_counter() - t0))
    tps = {name: statistics.median(v) for name, v in speeds.items()}
    print(f"model: {ours.num_params() / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}), batch {args.batch} x {args.seq}, {dtype}, {dev}, {torch.get_num_threads()} threads, "
          f"transformers attn={args.attn} (eager PyTorch); max |logit diff| at start {diff:.2e}")
    for name, v in speeds.items():
        print(f"{name + ':':<18} {tps[name]:>10,.0f} tokens/s  (rounds: {', '.join(f'{x:,.0f}' for x in v)})")
    return tps

if __name__ == "__main__":
    sys.exit(main())
