"""Report: per-stage counts, removal reasons, malformed-line samples, throughput and score histograms (PNG).

    phiforge data report runs/data            # every stage folder (one holding stats.json) under runs/data

Writes report.json, report.md and one PNG per histogram into --out (default: the first folder given).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text, check_writable


def collect(folders: list[str]) -> list[tuple[str, dict]]:
    found = []
    for f in map(Path, folders):
        if not f.exists():
            raise UserError(f"{f}: no such folder")
        for p in sorted(f.rglob("stats.json")):
            if any(part.startswith(".") for part in p.relative_to(f).parts[:-1]):
                continue  # the dedup signature phase's private stats
            found.append((str(p.parent), json.loads(p.read_text())))
    if not found:
        raise UserError(f"no stats.json under {folders}: run a stage first (stats appear when all units are done)")
    return found


def plot_hist(name: str, h: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = h["edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge",
           edgecolor="black", linewidth=0.3)
    ax.set_xlabel(name)
    ax.set_ylabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge data report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = check_writable(args.out or args.folders[0], "dir")
    out.mkdir(parents=True, exist_ok=True)
    stages = collect(args.folders)
    lines = ["| stage | folder | in | out | malformed | docs/s | top removal reasons |",
             "|---|---|---|---|---|---|---|"]
    report = []
    for folder, st in stages:
        rate = st["docs_in"] / st["seconds"] if st.get("seconds") else 0.0
        reasons = sorted(st["removed"].items(), key=lambda kv: -kv[1])
        pngs = []
        for name, h in st.get("hist", {}).items():
            png = out / f"{Path(folder).name}_{name.replace('/', '_').replace('(', '_').replace(')', '')}.png"
            plot_hist(name, h, png, f"{st['stage']}: {name}")
            pngs.append(png.name)
        report.append({"folder": folder, "stage": st["stage"], "docs_in": st["docs_in"], "docs_out": st["docs_out"],
                       "malformed": st["malformed"], "malformed_samples": st["malformed_samples"],
                       "removed": dict(reasons), "docs_per_s": round(rate, 1), "histograms": pngs,
                       "extra": st.get("extra", {})})
        top = ", ".join(f"{k} {v}" for k, v in reasons[:4])
        lines.append(f"| {st['stage']} | {folder} | {st['docs_in']} | {st['docs_out']} | {st['malformed']} | "
                     f"{rate:.0f} | {top} |")
    for r in report:
        for s in r["malformed_samples"]:
            lines.append(f"\nmalformed in {r['stage']}: {s['where']}: {s['reason']}: `{s['line'][:80]}`")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
