"""Plot a run's loss curves (train loss per step, validation loss per source) to a PNG.

    phiforge plot runs/tinystories                # writes runs/tinystories/loss.png
    phiforge plot runs/a runs/b --out cmp.png     # several runs on one figure
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phiforge.utils import UserError, check_writable


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a `phiforge pretrain` run directory?")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not valid JSON") from None
    return records


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="phiforge plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    ap.add_argument("--out", help="PNG path (default: RUN/loss.png of the first run)")
    args = ap.parse_args(argv)
    out = check_writable(args.out if args.out else Path(args.runs[0]) / "loss.png")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in args.runs:
        records = read_metrics(run)
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
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(out)
    print(f"plot: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))
