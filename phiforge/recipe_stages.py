"""The stages of `phiforge recipe` and what they share: the context (the resolved recipe and the run folder's paths),
logging each stage to OUT/logs/, and running a stage's command in this process. phiforge/recipe.py holds the
config and the runner (skip / resume); phiforge/recipe_report.py the report.

Each stage is (ctx) -> its output path. Training stages (pretrain, sft, dpo) get their config object directly
(`train`); the other stages run their documented command line (`call`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
from pathlib import Path

from phiforge.recipe_report import slug, write_report
from phiforge.utils import UserError, atomic_write_json, atomic_write_text, shared_dir


# ----------------------------------------------------------------------------------------------------------------
# Stage plumbing


class Ctx:
    """What every stage sees: the resolved recipe and the run directory's paths."""

    def __init__(self, cfg: dict, out: Path, verbose: bool):
        self.cfg, self.out, self.verbose = cfg, out, verbose
        self.data = out / "data"
        self.stories = bool(cfg["data"])

    def p(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def threads_flags(self) -> dict:
        return {"threads": self.cfg["threads"]} if self.cfg["threads"] else {}

    def sources(self) -> dict[str, Path]:
        """Pretraining sources: name -> documents (decontaminated)."""
        s = {"source": self.data / "source.jsonl.gz", "clean": self.data / "clean"}
        if (self.data / "textbook.jsonl.gz").exists():
            s["textbook"] = self.data / "textbook.jsonl.gz"
        return s

    def models_for_eval(self) -> dict[str, Path]:
        """label -> model folder, in the order the report shows them."""
        m = {"pretrain": self.p("pretrain", "final"), "sft": self.p("sft", "final"), "dpo (final)": self.p("final")}
        for bits in self.cfg["quantize"]["bits"]:
            m[f"final int{bits}"] = self.p("quant", f"int{bits}")
        return m

    def benchmark_dir(self) -> Path | None:
        d = self.cfg["eval"]["data_dir"]
        if d in (None, "", "none"):
            return None
        if d == "auto":
            s = shared_dir()
            return s / "data" if s is not None and (s / "data").is_dir() else None
        if not Path(d).is_dir():
            raise UserError(f"eval.data_dir {d} is not a folder")
        return Path(d)


class _Tee:
    """Write to a log file and (unless quiet) to the console."""

    def __init__(self, log, console):
        self.log, self.console = log, console

    def write(self, s):
        self.log.write(s)
        if self.console is not None:
            self.console.write(s)
        return len(s)

    def flush(self):
        self.log.flush()
        if self.console is not None:
            self.console.flush()

    def isatty(self):
        return False


@contextlib.contextmanager
def logged(ctx: Ctx, name: str, header: str = ""):
    """Send stdout/stderr to OUT/logs/<name>.log (and the console unless --quiet) for the duration."""
    log_path = ctx.p("logs", f"{name}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n{header}\n")
        out = _Tee(log, sys.stdout if ctx.verbose else None)
        err = _Tee(log, sys.stderr if ctx.verbose else None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield log_path


def call(ctx: Ctx, name: str, module: str, argv: list[str]) -> None:
    """Run one stage's documented CLI entry point, `module.main(argv)`, in this process, logged. A non-zero return
    code stops the recipe."""
    import importlib

    main = importlib.import_module(module).main
    with logged(ctx, name, f"$ phiforge {name} {' '.join(argv)}") as log_path:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse rejected the arguments: say where, do not exit silently
            rc = e.code
    if rc:
        raise UserError(f"{module} exited with {rc}; see {log_path}")


def write_yaml(path: Path, data: dict) -> Path:
    from phiforge.train.config import dump_yaml

    atomic_write_text(path, dump_yaml(data))
    return path


def train(ctx: Ctx, name: str, settings: dict) -> None:
    """Run training stage `name` (pretrain, sft, dpo) in this process on a config object built from `settings` (the
    recipe's section plus the paths it owns), checked like the stage's own --config, logged; it resumes from its
    last checkpoint after a kill. OUT/configs/<name>.yaml records the settings: `phiforge <name> --config` of that
    file runs the same stage. A non-zero return code stops the recipe."""
    import importlib

    from phiforge.train.config import resolve_config
    from phiforge.train.state import latest_checkpoint

    module = importlib.import_module(f"phiforge.train.{name}")
    cls = {"pretrain": "PretrainConfig", "sft": "SFTConfig", "dpo": "DPOConfig"}[name]
    resume = "latest" if latest_checkpoint(Path(settings["out"])) is not None else None
    cfg_path = write_yaml(ctx.p("configs", f"{name}.yaml"), settings)
    with logged(ctx, name, f"$ phiforge {name} --config {cfg_path}" + (" --resume" if resume else "")) as log_path:
        rc = module.train(resolve_config(getattr(module, cls), None, settings), resume)
    if rc:
        raise UserError(f"{module.__name__} exited with {rc}; see {log_path}")


# ----------------------------------------------------------------------------------------------------------------
# The stages: each (ctx) -> its output path


def stage_corpus(ctx: Ctx) -> Path:
    """Documents, held-out text, SFT and DPO sets (phiforge.recipe_data)."""
    from phiforge import recipe_data

    c = ctx.cfg["corpus"]
    shutil.rmtree(ctx.data, ignore_errors=True)  # a killed corpus stage leaves partial files: start clean
    if ctx.stories:
        info = recipe_data.build_stories(ctx.cfg["data"], ctx.data, c["budget_bytes"], c["heldout_fraction"],
                                         c["heldout_max"], c["sft_max"], ctx.cfg["seed"])
    else:
        info = recipe_data.build_stdlib(ctx.data, c["budget_bytes"], c["heldout_fraction"], c["heldout_max"],
                                        c["heldout_max_bytes"], c["sft_max"], ctx.cfg["seed"], c["chunk_bytes"])
    atomic_write_json(ctx.data / "corpus.json", info)
    return ctx.data


def stage_decontam(ctx: Ctx) -> Path:
    """`phiforge data decontam`: drop pretraining documents that share a word 13-gram with the held-out text or with
    the benchmark sets the eval stage scores (Phi-3 report section 2; GPT-3 appendix C); then split the survivors by
    source into data/source.jsonl.gz and data/textbook.jsonl.gz."""
    from phiforge.data.io import read_jsonl, write_jsonl

    eval_sets = [str(ctx.data / "heldout.txt")]
    bench = ctx.benchmark_dir()
    for task in ctx.cfg["eval"]["benchmarks"] if bench is not None else []:
        d = bench / task.split("_")[0]  # arc_easy -> arc/, hellaswag/, mmlu/ (the ../shared/data layout)
        if d.is_dir() and str(d) not in eval_sets:
            eval_sets.append(str(d))
    out = ctx.data / "decontam"
    call(ctx, "data-decontam", "phiforge.data.decontam",
         [str(ctx.data / "documents.jsonl.gz"), "--out", str(out), "--eval-sets", *eval_sets, "--min-words", "13"])
    docs = [d for shard in sorted(out.glob("*.jsonl.gz")) for d in read_jsonl(shard)]
    names = {d["set"] for d in read_jsonl(ctx.data / "documents.jsonl.gz")}
    for name in sorted(names):
        kept = [d for d in docs if d["set"] == name]
        if not kept:
            raise UserError(f"decontamination removed every {name} document (see {out / 'stats.json'}); the "
                            "held-out text or a benchmark overlaps the whole corpus")
        write_jsonl(ctx.data / f"{name}.jsonl.gz", kept)
    return out


def stage_filter(ctx: Ctx) -> Path:
    """Stories: `phiforge data filter` (Gopher/C4 heuristics). Code: those prose rules drop nearly every source file
    (symbol and alphabetic-word ratios), so the code analogue is the docstring ratio: files whose module, functions
    and classes mostly carry docstrings (corpus.min_doc_ratio)."""
    from phiforge.data.io import read_jsonl, write_jsonl

    if not ctx.stories:
        out = ctx.data / "filtered.jsonl.gz"
        docs = list(read_jsonl(ctx.data / "source.jsonl.gz"))
        keep = [d for d in docs if d["doc_ratio"] >= ctx.cfg["corpus"]["min_doc_ratio"]]
        write_jsonl(out, keep)
        atomic_write_json(ctx.data / "filtered.json", {"docs_in": len(docs), "docs_out": len(keep)})
        return out
    out = ctx.data / "filtered"
    call(ctx, "data-filter", "phiforge.data.filters", [str(ctx.data / "source.jsonl.gz"), "--out", str(out),
                                                       "--min-words", "20"])
    return out


def stage_dedup(ctx: Ctx) -> Path:
    """`phiforge data dedup`: exact + MinHash near-duplicates removed from the filtered documents."""
    src = ctx.data / ("filtered" if ctx.stories else "filtered.jsonl.gz")
    out = ctx.data / "clean"
    call(ctx, "data-dedup", "phiforge.data.dedup", [str(src), "--out", str(out)])
    if not any(out.glob("*.jsonl.gz")):
        raise UserError(f"dedup wrote no shards to {out}")
    return out


def stage_tokenizer(ctx: Ctx) -> Path:
    out = ctx.p("tokenizer")
    call(ctx, "tokenizer", "phiforge.tokenizer", ["--files", str(ctx.data / "tokenizer_corpus.txt"),
                                                  "--vocab-size", str(ctx.cfg["tokenizer"]["vocab_size"]),
                                                  "--out", str(out)])
    return out


def stage_tokenize(ctx: Ctx) -> Path:
    """`phiforge tokenize` once per source (it resumes by itself: finished chunks are kept)."""
    out = ctx.p("tokens")
    for name, inp in ctx.sources().items():
        call(ctx, "tokenize", "phiforge.train.tokenize",
             [str(inp), "--tokenizer", str(ctx.p("tokenizer")), "--out", str(out / name), "--workers", "1",
              "--val-fraction", str(ctx.cfg["tokenize"]["val_fraction"]), "--seed", str(ctx.cfg["seed"])])
    return out


def pretrain_config(ctx: Ctx) -> dict:
    pre = copy.deepcopy(ctx.cfg["pretrain"])
    names = list(ctx.sources())
    steps = int(pre.get("max_steps", 100))
    phases, bound = [], 0
    for i, ph in enumerate(ctx.cfg["phases"]):
        weights = {k: v for k, v in ph["weights"].items() if k in names}
        if not weights:
            raise UserError(f"recipe phase {ph.get('name', i)}: none of its sources {list(ph['weights'])} exist "
                            f"(sources: {', '.join(names)})")
        p = {"name": ph.get("name", f"phase{i + 1}"), "weights": weights}
        if i < len(ctx.cfg["phases"]) - 1:
            bound = max(bound + 1, round(float(ph["fraction"]) * steps))
            p["until_step"] = bound
        phases.append(p)
    return {**pre, "seed": ctx.cfg["seed"], "out": str(ctx.p("pretrain")),
            "sources": {n: str(ctx.p("tokens", n)) for n in names}, "phases": phases,
            "tokenizer": str(ctx.p("tokenizer")), **ctx.threads_flags()}


def stage_pretrain(ctx: Ctx) -> Path:
    """`phiforge pretrain` with the two-phase mixture; resumes from its last checkpoint after a kill."""
    run = ctx.p("pretrain")
    train(ctx, "pretrain", pretrain_config(ctx))
    call(ctx, "plot", "phiforge.train.plot", [str(run), "--out", str(run / "loss.png")])
    return run / "final"


def posttrain_config(ctx: Ctx, stage: str) -> dict:
    """The `phiforge sft` / `phiforge dpo` config: the recipe's section plus the paths the recipe owns."""
    model, data = {"sft": (ctx.p("pretrain", "final"), "sft.jsonl"), "dpo": (ctx.p("sft", "final"), "dpo.jsonl")}[stage]
    return {**ctx.cfg[stage], "seed": ctx.cfg["seed"], "out": str(ctx.p(stage)), "model": str(model),
            "data": [str(ctx.data / data)], **ctx.threads_flags()}


def stage_sft(ctx: Ctx) -> Path:
    """`phiforge sft` on the pretrained model; resumes from its last checkpoint after a kill."""
    train(ctx, "sft", posttrain_config(ctx, "sft"))
    return ctx.p("sft", "final")


def stage_dpo(ctx: Ctx) -> Path:
    """`phiforge dpo` on the SFT model; its export becomes OUT/final (the model to chat with)."""
    run = ctx.p("dpo")
    train(ctx, "dpo", posttrain_config(ctx, "dpo"))
    final, tmp = ctx.p("final"), ctx.p(".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "final", tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def stage_quantize(ctx: Ctx) -> Path:
    """`phiforge quantize` of the final model at each of quantize.bits (round-to-nearest)."""
    q = ctx.cfg["quantize"]
    for bits in q["bits"]:
        call(ctx, "quantize", "phiforge.quant.cli", [str(ctx.p("final")), "--bits", str(bits), "--group-size",
                                                 str(q["group_size"]), "--out", str(ctx.p("quant", f"int{bits}"))])
    return ctx.p("quant")


def stage_eval(ctx: Ctx) -> Path:
    """`phiforge perplexity` of the held-out text under every model (pretrain, SFT, final fp32/int8/int4; the
    quantized ones also get KL against the fp32 final model), plus benchmark subsets of the final model with
    `phiforge eval` when benchmark data is available. Each result file is its own resume point."""
    e = ctx.cfg["eval"]
    out = ctx.p("eval")
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(ctx.cfg["threads"])] if ctx.cfg["threads"] else []
    for label, folder in ctx.models_for_eval().items():
        res = out / f"ppl_{slug(label)}.json"
        if res.exists():
            continue
        ref = ["--reference", str(ctx.p("final"))] if label.startswith("final int") else []
        call(ctx, "perplexity", "phiforge.perplexity",
             [str(folder), "--data", str(ctx.data / "heldout.txt"), *ref, "--json", str(res), *threads])
    bench = ctx.benchmark_dir()
    if bench is not None and e["benchmarks"]:
        for task in e["benchmarks"]:
            res = out / f"bench_{task}.json"
            if res.exists():
                continue
            limit = e["mmlu_limit"] if task == "mmlu" else e["limit"]
            call(ctx, "eval", "phiforge.eval.harness",
                 [str(ctx.p("final")), "--tasks", task, "--data-dir", str(bench), "--limit", str(limit),
                  "--num-fewshot", str(e["num_fewshot"]), "--batch-size", str(e["batch_size"]), "--out", str(res)])
    return out


def stage_samples(ctx: Ctx) -> Path:
    """Greedy answers of the final model to held-out questions (modules never trained on), next to the reference
    answer, and a raw completion of the pretrained model."""
    import torch

    from phiforge import load
    from phiforge.generate import generate

    s = ctx.cfg["samples"]
    if ctx.cfg["threads"]:
        torch.set_num_threads(ctx.cfg["threads"])
    qa = [json.loads(ln) for ln in (ctx.data / "heldout_sft.jsonl").read_text().splitlines() if ln.strip()][:s["n"]]
    model, tok = load(str(ctx.p("final")))
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["messages"][0]["content"]}],
                                       add_generation_prompt=True, tokenize=True) for r in qa]
    answers = generate(model, tok, prompts, max_new_tokens=s["max_new_tokens"], temperature=0.0) if prompts else []
    chat = [{"prompt": r["messages"][0]["content"], "reference": r["messages"][1]["content"],
             "answer": tok.decode(a.token_ids, skip_special_tokens=True).strip(), "finish": a.finish_reason}
            for r, a in zip(qa, answers)]
    base, btok = load(str(ctx.p("pretrain", "final")))
    opening = "Once upon a time" if ctx.stories else 'def is_palindrome(text):\n    """'
    comp = generate(base, btok, [opening], max_new_tokens=2 * s["max_new_tokens"], temperature=0.0)[0]
    out = ctx.p("eval", "samples.json")
    text = btok.decode(comp.token_ids, skip_special_tokens=True)
    atomic_write_json(out, {"chat": chat, "completion": {"prompt": opening, "text": text}})
    return out





def stage_report(ctx: Ctx) -> Path:
    """OUT/report.md + report.json + PNGs (phiforge.recipe_report)."""
    return write_report(ctx, [name for name, _ in STAGES])


STAGES = [("corpus", stage_corpus), ("decontam", stage_decontam), ("filter", stage_filter), ("dedup", stage_dedup),
          ("tokenizer", stage_tokenizer),
          ("tokenize", stage_tokenize), ("pretrain", stage_pretrain), ("sft", stage_sft), ("dpo", stage_dpo),
          ("quantize", stage_quantize), ("eval", stage_eval), ("samples", stage_samples), ("report", stage_report)]

