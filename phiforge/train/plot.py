"""Plot a run's loss curves (train loss per step, validation loss per source) to a PNG.

    phiforge plot runs/tinystories                # writes runs/tinystories/loss.png
    phiforge plot runs/a runs/b --out cmp.png     # several runs on one figure
    phiforge plot runs/tinystories/train --hline "transformers loop=1.017"   # + a reference line on held-out bpb

Runs that logged `heldout_bpb` (pretrain's `heldout` setting) get a second panel: held-out bits per byte against
training minutes, with each --hline as a horizontal reference. Mixture-of-experts runs (records with `moe/load`)
get the expert load of the first such run: each expert's share of the routed tokens per logged step, and per layer
over the whole run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phiforge.data.io import read_jsonl
from phiforge.utils import ArgumentParser, UserError, check_writable


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a `phiforge pretrain` run directory?")
    return list(read_jsonl(path))


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def plot_heldout(ax, all_records: dict, hlines: list[tuple[str, float]]) -> None:
    """Held-out bits per byte against training minutes, one line per run, plus reference lines."""
    for run, records in all_records.items():
        pts = [(r["elapsed_s"] / 60, r["heldout_bpb"]) for r in records if "heldout_bpb" in r and "elapsed_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{Path(run).name} (last {pts[-1][1]:.3f})")
    for i, (label, value) in enumerate(hlines):
        ax.axhline(value, color=f"C{i + 3}", ls="--", label=f"{label} ({value:g})")
    ax.set_xlabel("training minutes (compile and evaluation included)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("held-out bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_expert_load(ax_steps, ax_layers, run: str, records: list[dict]) -> None:
    """Heatmaps of the routed-token shares: experts x logged steps (all layers), and layers x experts (the mean
    over the run's records). An even router shows one flat colour at 1/E."""
    rows = [r for r in records if "moe/load" in r]
    steps = [r["step"] for r in rows]
    load = [[r["moe/load"][e] for r in rows] for e in range(len(rows[0]["moe/load"]))]  # (E, records)
    im = ax_steps.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis",
                         extent=(steps[0] - 0.5, steps[-1] + 0.5, len(load) - 0.5, -0.5))
    ax_steps.figure.colorbar(im, ax=ax_steps, label="share of routed tokens")
    ax_steps.set_yticks(range(len(load)))
    ax_steps.set_xlabel("step")
    ax_steps.set_ylabel("expert")
    ax_steps.set_title(f"{Path(run).name}: expert load (all layers; even = {1 / len(load):.3f})")
    per_layer = [r["moe/load_layers"] for r in rows if "moe/load_layers" in r]
    if per_layer:  # (records, L, E) -> (L, E)
        mean = [[sum(m[i][e] for m in per_layer) / len(per_layer) for e in range(len(per_layer[0][0]))]
                for i in range(len(per_layer[0]))]
        im = ax_layers.imshow(mean, aspect="auto", interpolation="nearest", cmap="viridis")
        ax_layers.figure.colorbar(im, ax=ax_layers, label="mean share of routed tokens")
        ax_layers.set_title("expert load per layer (mean over the run)")
        ax_layers.set_xticks(range(len(mean[0])))
        ax_layers.set_yticks(range(len(mean)))
    ax_layers.set_xlabel("expert")
    ax_layers.set_ylabel("layer")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", help="PNG path (default: RUN/loss.png of the first run)")
    ap.add_argument("--hline", action="append", default=[], metavar="LABEL=VALUE",
                    help="a horizontal reference line on the held-out bits-per-byte panel (repeatable)")
    args = ap.parse_args(argv)
    out = check_writable(args.out if args.out else Path(args.runs[0]) / "loss.png")
    hlines = []
    for h in args.hline:
        label, _, value = h.rpartition("=")
        try:
            hlines.append((label or "reference", float(value)))
        except ValueError:
            raise UserError(f"--hline {h!r}: expected LABEL=NUMBER") from None

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_records = {run: read_metrics(run) for run in args.runs}
    heldout = any("heldout_bpb" in r for recs in all_records.values() for r in recs)
    moe = next((run for run, recs in all_records.items() if any("moe/load" in r for r in recs)), None)
    panels = 1 + heldout + 2 * (moe is not None)
    fig, axes = plt.subplots(1, panels, figsize=(8 if panels == 1 else 7.5 * panels, 5), squeeze=False)
    ax = axes[0][0]
    for run, records in all_records.items():
        label = Path(run).name
        train = [r for r in records if "loss" in r]
        if train:
            steps = [r["step"] for r in train]
            losses = [r["loss"] for r in train]
            ax.plot(steps, losses, alpha=0.25, color="C0" if len(args.runs) == 1 else None)
            ax.plot(steps, ema(losses), label=f"{label} train (EMA)")
        val_keys = sorted({k for r in records for k in r if k.startswith("val/")})
        for key in val_keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{label} {key}")
        switches = [train[i]["step"] for i in range(1, len(train))
                    if train[i].get("phase") != train[i - 1].get("phase")]
        for s in switches:
            ax.axvline(s, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("phiforge pretrain" + (" (dashed: phase switch)" if len(args.runs) == 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    if heldout:
        plot_heldout(axes[0][1], all_records, hlines)
    if moe is not None:
        plot_expert_load(axes[0][panels - 2], axes[0][panels - 1], moe, all_records[moe])
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(out)
    print(f"plot: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
