"""`phiforge eval`: the Phi-3 report's benchmarks, scored the way lm-evaluation-harness scores them, offline.

    phiforge eval runs/sft/final --tasks mmlu,hellaswag,arc_easy,arc_challenge,piqa --data-dir ../shared/data
    phiforge eval runs/sft/final --tasks gsm8k,humaneval,mbpp --limit 50 --out results/gen.json
    phiforge eval http://localhost:8000/v1 --model-name phi3 --tasks mt_bench --judge-url https://api.openai.com/v1
    phiforge eval runs/sft/final --tasks perplexity,passkey --text-files notes.txt --context-lengths 1024,4096

MODEL is a local folder (phiforge.load) or an OpenAI-compatible base URL. Writes OUT (JSON: metrics with standard
errors, config), OUT with .samples.jsonl (one line per example) and .md (a table). See docs/eval.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import random
import sys
import time
from pathlib import Path

from phiforge.eval.metrics import aggregate, mc_scores
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text, check_writable, shared_dir


def available_tasks() -> list[str]:
    import phiforge.eval.tasks as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def get_task(name: str):
    if name not in available_tasks():
        raise UserError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return importlib.import_module(f"phiforge.eval.tasks.{name}")


def load_backend(model: str, args):
    if model.startswith(("http://", "https://")):
        if args.add_bos_token is not None:
            raise UserError("--add-bos-token applies to local models; a server tokenizes with its own tokenizer")
        from phiforge.eval.openai_backend import OpenAILM
        return OpenAILM(model, args.model_name, batch_size=args.batch_size)
    if not Path(model).exists():
        raise UserError(f"model {model!r} is neither a local folder nor an http(s):// URL")
    from phiforge import load
    from phiforge.eval.lm import LocalLM
    net, tok = load(model, dtype=args.dtype, device=args.device)
    if tok is None:
        raise UserError(f"{model} has no tokenizer files (tokenizer.json or tokenizer.model)")
    return LocalLM(net, tok, batch_size=args.batch_size, max_length=args.max_length, add_bos_token=args.add_bos_token)


def run_multiple_choice(lm, docs: list[dict], name: str) -> list[dict]:
    pairs = [p for d in docs for p in d["pairs"]]
    results = iter(lm.loglikelihood(pairs, progress=True) if pairs else [])
    rows = []
    for d in docs:
        lls = [next(results)[0] for _ in d["pairs"]]
        s = mc_scores(lls, d["choice_lens"], d["gold"])
        rows.append({"task": name, **{k: v for k, v in d.items() if k not in ("pairs",)},
                     "context": d["pairs"][0][0], "continuations": [c for _, c in d["pairs"]],
                     "loglikelihoods": lls, **s})
    return rows


def run_generate(lm, docs: list[dict], name: str, mod, max_gen_toks: int | None) -> list[dict]:
    outputs = [""] * len(docs)
    groups: dict[tuple, list[int]] = {}  # docs that share stop strings and length generate as one batch
    for i, d in enumerate(docs):
        groups.setdefault((tuple(d.get("until", ())), max_gen_toks or d.get("max_gen_toks", 256)), []).append(i)
    for (until, n), idx in groups.items():
        for i, text in zip(idx, lm.generate_many([docs[i]["prompt"] for i in idx], list(until), n)):
            outputs[i] = text
    rows = mod.score(docs, outputs)
    return [{"task": name, **d, "output": o, **r} for d, o, r in zip(docs, outputs, rows)]


def evaluate(lm, tasks: list[str], data_dir: Path, args) -> tuple[dict, list[dict]]:
    results, samples = {}, []
    mods = {name: get_task(name) for name in tasks}  # unknown task: fail before any work
    for name, mod in mods.items():
        k = mod.DEFAULT_FEWSHOT if args.num_fewshot is None else args.num_fewshot
        t0 = time.time()
        docs = mod.load(data_dir, num_fewshot=k, seed=args.seed, **_task_options(mod, args, lm))
        docs = mod.select(docs, args.limit) if hasattr(mod, "select") else docs[:args.limit]
        if mod.OUTPUT == "multiple_choice":
            rows = run_multiple_choice(lm, docs, name)
        elif mod.OUTPUT == "generate":
            rows = run_generate(lm, docs, name, mod, args.max_gen_toks)
        else:  # custom: the task drives the model itself (perplexity, MT-bench)
            rows = [{"task": name, **r} for r in mod.run(lm, docs, args)]
        metrics = mod.aggregate(rows) if hasattr(mod, "aggregate") else aggregate(rows, mod.METRICS)
        results[name] = {**metrics, "n": len(rows), "num_fewshot": k, "seconds": round(time.time() - t0, 2)}
        samples += rows
        print(f"{name}: " + ", ".join(f"{m}={metrics[m]:.4f}" for m in mod.METRICS if m in metrics), file=sys.stderr)
    return results, samples


def _task_options(mod, args, lm) -> dict:
    names = getattr(mod, "OPTIONS", ())
    opts = {n: getattr(args, n) for n in names if n != "lm"}
    if "lm" in names:
        opts["lm"] = lm
    return opts


def _no_nan(obj):
    """NaN (a standard error of one sample) as null, so the JSON is strict."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def markdown_table(results: dict, metrics_of: dict) -> str:
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for m in metrics_of[name]:
            if m in res:
                se = res.get(f"{m}_stderr")
                se_txt = f"{se:.4f}" if isinstance(se, float) and se == se else "-"
                lines.append(f"| {name} | {m} | {res[m]:.4f} | {se_txt} | {res['n']} |")
        for sub, val in res.items():  # per-category / per-subject breakdowns (MMLU)
            if isinstance(val, dict):
                for m in metrics_of[name]:
                    if m in val:
                        se = val.get(f"{m}_stderr", float("nan"))
                        lines.append(f"| {name}/{sub} | {m} | {val[m]:.4f} | {se:.4f} | {val.get('n', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model", help="local model folder or OpenAI-compatible base URL (http://host:port/v1)")
    ap.add_argument("--tasks", required=True, action="append",
                    help=f"comma-separated, repeatable; any of: {', '.join(available_tasks())}")
    ap.add_argument("--data-dir", default=None, help="benchmark data laid out like ../shared/data (the default)")
    ap.add_argument("--from-hub", action="store_true",
                    help="fetch missing data files from the HF hub into --data-dir (needs `datasets` and a network)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="override every task's default few-shot count")
    ap.add_argument("--limit", type=int, default=None, help="first N examples per task (per subject for MMLU)")
    ap.add_argument("--out", default=None, help="results JSON (also writes .samples.jsonl and .md beside it)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="context window (default: the model's)")
    ap.add_argument("--max-gen-toks", type=int, default=None, help="override generation length of every task")
    ap.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend BOS to every context (or, --no-add-bos-token, add no special tokens), as lm-eval's "
                         "add_bos_token model argument; default: as the tokenizer does")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-name", default=None, help="model name sent to an OpenAI-compatible MODEL URL")
    ap.add_argument("--judge-url", default=None, help="MT-bench judge: OpenAI-compatible base URL")
    ap.add_argument("--judge-model", default="gpt-4", help="MT-bench judge model name")
    ap.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    ap.add_argument("--text-files", nargs="*", default=[], help="perplexity task: text files to score")
    ap.add_argument("--context-lengths", default="1024,2048,4096", help="passkey task: context lengths in tokens")
    args = ap.parse_args(argv)
    if args.out:
        check_writable(args.out)  # the results are written after the whole run: a bad path must fail first

    # --tasks a,b --tasks c: every one runs (a repeated flag used to keep only the last)
    tasks = list(dict.fromkeys(t.strip() for arg in args.tasks for t in arg.split(",") if t.strip()))
    args.tasks = ",".join(tasks)
    needs_data = [t for t in tasks if getattr(get_task(t), "NEEDS_DATA", True)]
    if args.data_dir is None and not needs_data:
        args.data_dir = "."  # perplexity on --text-files, passkey: nothing is read from it
    if args.data_dir is None:
        if shared_dir() is None:
            raise UserError("no --data-dir given and ../shared/data not found")
        args.data_dir = str(shared_dir() / "data")
    data_dir = Path(args.data_dir)
    if args.from_hub:
        from phiforge.eval.hub import fetch
        for t in tasks:
            fetch(t, data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder")

    random.seed(args.seed)
    import numpy as np
    import torch
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    lm = load_backend(args.model, args)
    results, samples = evaluate(lm, tasks, data_dir, args)
    metrics_of = {t: get_task(t).METRICS for t in tasks}
    table = markdown_table(results, metrics_of)
    print(table)
    if args.out:
        out = Path(args.out)
        config = {k: v for k, v in vars(args).items()}
        atomic_write_json(out, _no_nan({"results": results, "config": config}))
        base = out.with_suffix("")
        atomic_write_text(base.with_suffix(".samples.jsonl"),
                          "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
        atomic_write_text(base.with_suffix(".md"), table)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
