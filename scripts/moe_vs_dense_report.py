"""Summary and figure of scripts/moe_vs_dense.sh: OUT/summary.json and docs/img/moe_vs_dense.png.

    python scripts/moe_vs_dense_report.py runs/moe_vs_dense [docs/img/moe_vs_dense.png]

The figure: training loss against tokens and against wall time (smoothed over 15 steps), and the MoE's expert load
per layer over the whole run (share of the routed (token, pick) pairs each expert received; 0.25 = uniform).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def smooth(xs: list[float], k: int = 15) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def loss_at_tokens(train: list[dict], tokens: int, k: int = 15) -> float:
    """Mean training loss of the k steps ending where `tokens` tokens had been seen."""
    i = max(j for j, r in enumerate(train) if r["tokens"] <= tokens)
    window = train[max(0, i - k + 1):i + 1]
    return sum(r["loss"] for r in window) / len(window)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    png = Path(argv[1]) if len(argv) > 1 else out / "moe_vs_dense.png"
    runs = {v: [r for r in records(out / v) if "loss" in r] for v in ("dense", "moe")}
    common = min(r[-1]["tokens"] for r in runs.values())  # the tokens both runs saw
    summary = {}
    for v, train in runs.items():
        held = json.loads((out / v / "heldout.json").read_text())
        cfg = json.loads((out / v / "final" / "config.json").read_text())
        loads = [r["moe/load_layers"] for r in train if "moe/load_layers" in r]
        summary[v] = {
            "heldout_bits_per_byte": round(held["bits_per_byte"], 4),
            "steps": train[-1]["step"], "tokens": train[-1]["tokens"], "seconds": train[-1]["elapsed_s"],
            "tokens_per_s": round(train[-1]["tokens"] / train[-1]["elapsed_s"], 1),
            "train_loss_end": round(loss_at_tokens(train, train[-1]["tokens"]), 4),
            f"train_loss_at_{common}_tokens": round(loss_at_tokens(train, common), 4),
            "experts": cfg.get("num_local_experts"),
            "expert_load_whole_run": None if not loads else [
                [round(sum(rec[layer][e] for rec in loads) / len(loads), 4) for e in range(len(loads[0][0]))]
                for layer in range(len(loads[0]))],
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for v, train in runs.items():
        s = summary[v]
        label = f"{v}: held-out {s['heldout_bits_per_byte']:.3f} bits/byte, {s['tokens_per_s']:.0f} tok/s"
        ax[0].plot([r["tokens"] / 1e3 for r in train], smooth([r["loss"] for r in train]), label=label)
        ax[1].plot([r["elapsed_s"] / 60 for r in train], smooth([r["loss"] for r in train]), label=v)
    ax[0].set(xlabel="tokens (thousands)", ylabel="training loss (15-step mean)", title="per token")
    ax[1].set(xlabel="wall time (minutes)", ylabel="training loss (15-step mean)", title="per wall time (1 core each)")
    for a in ax[:2]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
        a.set_ylim(top=6)
    load = summary["moe"]["expert_load_whole_run"]
    if load:
        im = ax[2].imshow(load, cmap="viridis", vmin=0, vmax=max(max(row) for row in load), aspect="auto")
        for i, row in enumerate(load):
            for e, share in enumerate(row):
                ax[2].text(e, i, f"{share:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax[2].set(xlabel="expert", ylabel="layer", title="MoE expert load over the run (0.25 = uniform)",
                  xticks=range(len(load[0])), yticks=range(len(load)))
        fig.colorbar(im, ax=ax[2])
    fig.suptitle("Dense Phi-3 vs PhiMoE with the same active parameters, TinyStories, same tokens stream, "
                 "same wall time")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
