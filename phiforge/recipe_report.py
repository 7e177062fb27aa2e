"""The report of `phiforge recipe`: the numbers (report.json "metrics": identical on a resumed run), the plots, and
OUT/report.md. Reads only the run folder, through the stage context (phiforge.recipe_stages.Ctx: its paths and
ctx.sources() / ctx.models_for_eval() / ctx.benchmark_dir()), so it imports nothing of the stage graph.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from phiforge.data.io import read_jsonl
from phiforge.utils import atomic_write_json, atomic_write_text


def write_report(ctx, stage_names: list[str]) -> Path:
    """OUT/report.md + report.json + PNGs (loss curves, evaluation table, perplexity against bits)."""
    rep = ctx.p("report")
    rep.mkdir(parents=True, exist_ok=True)
    m = collect_metrics(ctx)
    timings = {}  # stage -> [wall seconds, CPU seconds of this process, all threads]
    for name in stage_names:
        marker = _json(ctx.p(".recipe", f"{name}.json"))
        if marker:
            timings[name] = [marker["seconds"], marker.get("cpu_seconds")]
    rows = eval_rows(m)
    plot_losses(ctx, rep / "loss_curves.png")
    plot_table(rows, rep / "eval_table.png")
    plot_bits(m, rep / "ppl_vs_bits.png")
    atomic_write_json(ctx.p("report.json"), {"metrics": m, "timings_s": timings})
    atomic_write_text(ctx.p("report.md"), render_report(ctx, m, rows, timings))
    return ctx.p("report.md")


def slug(label: str) -> str:
    """A model label as a file-name part: "final int8" -> final_int8 (eval/ppl_<slug>.json)."""
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _jsonl(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.exists() else []


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect_metrics(ctx) -> dict:
    from phiforge import models

    m: dict = {"corpus": _json(ctx.data / "corpus.json")}
    dd = _json(ctx.data / "clean" / "clusters.json")
    m["dedup"] = {"documents": dd.get("documents"), "removed": dd.get("removed")}
    if ctx.stories:
        fs = _json(ctx.data / "filtered" / "stats.json")
        m["filter"] = {"docs_in": fs.get("docs_in"), "docs_out": fs.get("docs_out"), "removed": fs.get("removed")}
    st = _json(ctx.data / "decontam" / "stats.json")
    if st:
        m["decontam"] = {"docs_in": st["docs_in"], "docs_out": st["docs_out"],
                         "overlaps": {k.split(".", 1)[1]: v for k, v in st["extra"].items()
                                      if k.startswith("contaminated_by.")}}
    if not ctx.stories:
        m["filter"] = _json(ctx.data / "filtered.json")
    m["tokens"] = {}
    for name in ctx.sources():
        meta = _json(ctx.p("tokens", name, "meta.json"))
        m["tokens"][name] = {"train": meta.get("train", {}).get("tokens"), "val": meta.get("val", {}).get("tokens"),
                             "docs": meta.get("train", {}).get("docs")}
    hf = _json(ctx.p("pretrain", "final", "config.json"))
    if hf:
        mc = models.config_from_hf(hf)
        m["model"] = {"parameters": mc.num_params(), "hidden_size": mc.hidden_size, "layers": mc.num_hidden_layers,
                      "heads": mc.num_attention_heads, "vocab_size": mc.vocab_size,
                      "experts": getattr(mc, "num_local_experts", None)}
    recs = _jsonl(ctx.p("pretrain", "metrics.jsonl"))
    train = [r for r in recs if "loss" in r]
    if train:
        k = max(1, min(10, len(train) // 5))
        val_keys = sorted({key for r in recs for key in r if key.startswith("val/")})
        m["pretrain"] = {"steps": train[-1]["step"], "tokens": train[-1]["tokens"],
                         "loss_first": round(train[0]["loss"], 4),
                         "loss_last10": round(sum(r["loss"] for r in train[-k:]) / k, 4),
                         "phases": {ph: sum(1 for r in train if r.get("phase") == ph)
                                    for ph in dict.fromkeys(r.get("phase") for r in train)},
                         **{key: round([r[key] for r in recs if key in r][-1], 4) for key in val_keys},
                         **{f"{key}@first": round([r[key] for r in recs if key in r][0], 4) for key in val_keys}}
    sft_train = [r for r in _jsonl(ctx.p("sft", "metrics.jsonl")) if "loss" in r]
    sft_eval = _json(ctx.p("sft", "eval.json"))
    m["sft"] = {k: v for k, v in sft_eval.items() if k != "elapsed_s"}
    if sft_train:
        m["sft"].update(loss_first=round(sft_train[0]["loss"], 4), loss_last=round(sft_train[-1]["loss"], 4))
    dpo_recs = _jsonl(ctx.p("dpo", "metrics.jsonl"))
    m["dpo"] = {k: v for k, v in _json(ctx.p("dpo", "eval.json")).items() if k != "elapsed_s"}
    first_val = next((r for r in dpo_recs if "val_rewards/accuracies" in r), None)
    if first_val:
        m["dpo"]["val_loss@start"] = first_val["val_loss"]
    # bits per byte = the summed NLL (nats) of the held-out text / ln 2 / its UTF-8 bytes (tokenizer-independent)
    m["perplexity"] = {}
    heldout = ctx.data / "heldout.txt"
    n_bytes = len(heldout.read_bytes()) if heldout.exists() else 0
    for label in ctx.models_for_eval():
        r = _json(ctx.p("eval", f"ppl_{slug(label)}.json"))
        if r:
            m["perplexity"][label] = {"token_perplexity": r["ppl"], "tokens": r["tokens"],
                                      "bits_per_byte": r["nll"] * r["tokens"] / math.log(2) / n_bytes,
                                      **{k: r[k] for k in ("kl", "top1_agree") if k in r}}
    m["benchmarks"] = {}
    for p in sorted(ctx.p("eval").glob("bench_*.json")):
        for task, r in _json(p).get("results", {}).items():
            m["benchmarks"][task] = {k: v for k, v in r.items() if k in ("acc", "acc_norm", "acc_stderr",
                                                                          "acc_norm_stderr", "n", "num_fewshot")}
    m["samples"] = _json(ctx.p("eval", "samples.json"))
    return m


def eval_rows(m: dict) -> list[tuple[str, str, str]]:
    """(what, model, value) rows of the evaluation table."""
    rows = []
    for label, r in m.get("perplexity", {}).items():
        rows.append(("held-out bits per byte (lower is better)", label, f"{r['bits_per_byte']:.4f}"))
    for label, r in m.get("perplexity", {}).items():
        if "kl" in r:
            rows.append(("KL(fp32 final || quantized), nats/token; top-1 agreement", label,
                         f"{r['kl']:.5f}; {r['top1_agree']:.3f}"))
    if "end_rate" in m.get("sft", {}):
        rows.append((f"SFT held-out answers ending with <|end|> (n={m['sft']['n']})", "sft",
                     f"{m['sft']['end_rate']:.3f}"))
    if "val_loss" in m.get("sft", {}):
        rows.append(("SFT held-out assistant-token loss", "sft", f"{m['sft']['val_loss']:.4f}"))
    if "val_rewards/accuracies" in m.get("dpo", {}):
        rows.append((f"DPO held-out reward accuracy (n={m['dpo'].get('n_val')})", "dpo (final)",
                     f"{m['dpo']['val_rewards/accuracies']:.3f}"))
    for task, r in m.get("benchmarks", {}).items():
        metric = "acc_norm" if "acc_norm" in r else "acc"
        if metric in r:
            se = r.get(f"{metric}_stderr")
            rows.append((f"{task} {metric}, {r.get('num_fewshot', 0)}-shot (n={r.get('n')})", "dpo (final)",
                         f"{r[metric]:.3f}" + (f" ± {se:.3f}" if isinstance(se, float) else "")))
    return rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_losses(ctx, path: Path) -> None:
    from phiforge.train.plot import ema

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    recs = _jsonl(ctx.p("pretrain", "metrics.jsonl"))
    train = [r for r in recs if "loss" in r]
    ax = axes[0]
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, alpha=0.25, color="C0")
        ax.plot(steps, ema(losses), color="C0", label="train (EMA)")
        for i in range(1, len(train)):
            if train[i].get("phase") != train[i - 1].get("phase"):
                ax.axvline(train[i]["step"], color="gray", ls="--", lw=0.8, label=f"→ {train[i]['phase']}")
    for j, key in enumerate(sorted({k for r in recs for k in r if k.startswith("val/")})):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{j + 1}", label=key)
    ax.set(title="pretraining (two phases)", xlabel="step", ylabel="loss (nats/token)")
    _train_and_heldout(axes[1], _jsonl(ctx.p("sft", "metrics.jsonl")), "")
    axes[1].set(title="SFT (assistant tokens)", xlabel="step", ylabel="loss (nats/token)")
    ax = axes[2]
    va = _train_and_heldout(ax, _jsonl(ctx.p("dpo", "metrics.jsonl")), " loss")
    if va:
        # at step 0 the policy is the reference: every reward is 0 and "chosen > rejected" is a tie, not a 0.0
        acc = [r for r in va if r["step"] > 0]
        ax.plot([r["step"] for r in acc], [r["val_rewards/accuracies"] for r in acc], marker="s", ms=3, ls=":",
                label="held-out reward accuracy")
    ax.set(title="DPO", xlabel="step", ylabel="loss / accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def _train_and_heldout(ax, recs: list[dict], suffix: str) -> list[dict]:
    """The train loss and the held-out loss of a metrics.jsonl on `ax`; returns the held-out records."""
    tr, va = [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train" + suffix)
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], marker="o", ms=3, label="held-out" + suffix)
    return va


def plot_table(rows: list[tuple[str, str, str]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1))
    ax.axis("off")
    if rows:
        t = ax.table(cellText=[list(r) for r in rows], colLabels=["evaluation", "model", "value"], loc="center",
                     cellLoc="left", colWidths=[0.62, 0.18, 0.2])
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.scale(1, 1.3)
    ax.set_title("phiforge recipe: evaluation")
    _save(fig, path)
    plt.close(fig)


def plot_bits(m: dict, path: Path) -> None:
    plt = _plt()
    ppl = m.get("perplexity", {})
    pts = [(32, ppl["dpo (final)"]["bits_per_byte"])] if "bits_per_byte" in ppl.get("dpo (final)", {}) else []
    pts += [(int(label.split("int")[1]), r["bits_per_byte"]) for label, r in ppl.items()
            if label.startswith("final int") and "bits_per_byte" in r]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if pts:
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        for b, v in pts:
            ax.annotate(f"{v:.4f}", (b, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[0] for p in pts], [f"{p[0]}" + (" (fp32)" if p[0] == 32 else "") for p in pts])
    ax.set(title="final model: held-out bits per byte vs weight bits", xlabel="weight bits",
           ylabel="bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def render_report(ctx, m: dict, rows, timings: dict) -> str:
    c, out, nan = m.get("corpus", {}), ctx.out, float("nan")
    L = [f"# phiforge recipe report: `{out}`", ""]
    if c.get("corpus") == "python-stdlib":
        L.append(f"Corpus: the Python {c.get('python')} standard library on this machine (`{c.get('stdlib')}`), "
                 "as phi-1-style code-textbook data; no network used.")
    else:
        L.append(f"Corpus: stories from {', '.join(f'`{p}`' for p in c.get('inputs', []))}.")
    wall = sum(w for w, _ in timings.values())
    cpu = sum(c or 0 for _, c in timings.values())
    L += ["", f"Stage times, wall (CPU) seconds on this machine, the last attempt of each stage: "
          + ", ".join(f"{k} {w:.0f} ({c or 0:.0f})" for k, (w, c) in timings.items())
          + f"; total {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU.", ""]
    L += ["## Data", "", "| source | documents | train tokens | val tokens |", "|---|---|---|---|"]
    for name, t in m.get("tokens", {}).items():
        L.append(f"| {name} | {t.get('docs')} | {t.get('train')} | {t.get('val')} |")
    dd = m.get("dedup", {})
    L += ["", f"Held-out documents (never trained on): {c.get('heldout_docs')}. SFT records: {c.get('sft_records')}, "
          f"DPO pairs: {c.get('dpo_records')}. Dedup removed {dd.get('removed')} of {dd.get('documents')} filtered "
          "documents."]
    dc = m.get("decontam")
    if dc:
        L.append(f"Decontamination (a word 13-gram shared with the held-out text or the benchmark sets) removed "
                 f"{dc['docs_in'] - dc['docs_out']} of {dc['docs_in']} documents"
                 + (f" (documents per evaluation file: {dc['overlaps']})." if dc["overlaps"] else "."))
    if m.get("filter"):
        f = m["filter"]
        what = (f"heuristic filter (removed: {f.get('removed')})" if ctx.stories else
                f"docstring-ratio filter (>= {ctx.cfg['corpus']['min_doc_ratio']})")
        L.append(f"Phase-2 {what} kept {f['docs_out']} of {f['docs_in']} documents.")
    if "model" in m:
        mm = m["model"]
        arch = (f"PhiMoE architecture ({mm['experts']} experts, top-2)" if mm.get("experts")
                else "Phi-3 architecture")
        L += ["", f"Model: {arch}, {mm['parameters'] / 1e6:.2f}M parameters ({mm['layers']} layers, "
              f"hidden {mm['hidden_size']}, {mm['heads']} heads, vocab {mm['vocab_size']})."]
    p = m.get("pretrain", {})
    if p:
        vals = ", ".join(f"{k} {p[f'{k}@first']:.3f} → {p[k]:.3f}" for k in p if k.startswith("val/")
                         and "@" not in k) or "none (no validation documents)"
        L += ["", "## Loss curves", "",
              f"Pretraining: {p['steps']} steps, {p['tokens']:,} tokens, phases {p['phases']}; train loss "
              f"{p['loss_first']:.3f} → {p['loss_last10']:.3f} (mean of the last steps); validation {vals}.",
              f"SFT: loss {m['sft'].get('loss_first', nan):.3f} → {m['sft'].get('loss_last', nan):.3f}."
              f" DPO: held-out loss {m['dpo'].get('val_loss@start', nan):.4f} → {m['dpo'].get('val_loss', nan):.4f}.",
              "", "![loss curves](report/loss_curves.png)", ""]
    L += ["## Evaluation", "", "| evaluation | model | value |", "|---|---|---|"]
    L += [f"| {a.replace('|', '&#124;')} | {b} | {v} |" for a, b, v in rows]
    if ctx.benchmark_dir() is None:
        L += ["", "Benchmarks (ARC, HellaSwag, MMLU) skipped: no benchmark data folder (set eval.data_dir)."]
    L += ["", "![evaluation table](report/eval_table.png)", "", "## Perplexity against weight bits", "",
          "![bits per byte vs bits](report/ppl_vs_bits.png)", "", "## Samples (greedy)", ""]
    s = m.get("samples", {})
    for r in s.get("chat", []):
        L += [f"**user:** {r['prompt']}  ", f"**model:** {r['answer']}  ", f"**reference:** {r['reference']}", ""]
    if s.get("completion"):
        L += ["Pretrained model, raw completion:", "", "```", s["completion"]["prompt"] + s["completion"]["text"],
              "```", ""]
    L += [f"chat with it: phiforge chat {out / 'final'}", ""]
    return "\n".join(L)
