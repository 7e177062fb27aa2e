"""`phiforge recipe`: the whole Phi-3 recipe in one command, resumable, with a report.

    phiforge recipe --out runs/default                        # the embedded default: a stdlib "code textbook" model
    phiforge recipe --smoke --out runs/smoke                  # every stage at toy size (CI, < 3 minutes)
    phiforge recipe --data ../shared/data/tinystories --out runs/stories      # the same recipe on stories
    phiforge recipe --recipe recipes/default.yaml --set pretrain.max_steps=600 --out runs/longer

Stages, each reading the previous one's output (docs/recipe.md):
  corpus -> decontam -> filter -> dedup -> tokenizer -> tokenize -> pretrain (two phases) -> sft -> dpo -> quantize
  -> eval -> samples -> report
A stage is skipped when its done-marker (OUT/.recipe/<stage>.json, written atomically after the stage's output is
complete) exists, so rerunning a killed run continues it; a killed pretrain/sft/dpo resumes from its last checkpoint.

Config precedence: the embedded DEFAULTS (= recipes/default.yaml) < SMOKE (with --smoke) < --recipe FILE < --data /
--threads / --set key.sub=value flags. The resolved recipe is printed and saved as OUT/recipe.yaml; a rerun into the
same OUT may change only keys that no finished stage read (a run that failed at pretraining takes a corrected
pretrain.* key). The `pretrain`, `sft` and `dpo` sections are passed through as those stages' own YAML configs, so
any of their keys (phiforge pretrain/sft/dpo --help) can be set there; they are checked before any stage runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import yaml

from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text, check_writable, shared_dir

# The embedded default: a ~5M-parameter model on ~6 MB of the standard library, about 10 minutes on 2 CPU cores.
DEFAULTS: dict = {
    "seed": 0,
    "data": [],  # text files/folders of stories (TinyStories format); empty = the Python standard library
    "threads": None,  # torch threads of the training stages (default: torch's choice, all cores)
    "corpus": {"budget_bytes": 6_000_000, "heldout_fraction": 0.03, "heldout_max": 8, "heldout_max_bytes": 15_000,
               "min_doc_ratio": 0.6, "sft_max": 3000, "chunk_bytes": 8000},
    "tokenizer": {"vocab_size": 4096},
    "tokenize": {"val_fraction": 0.03},
    # two phases (Phi-3 report section 2): phase 1 on everything, phase 2 on the filtered + deduplicated subset and
    # the textbook chapters, with a little phase-1 data kept. `fraction` = share of pretrain.max_steps.
    "phases": [{"name": "phase1", "weights": {"source": 1.0}, "fraction": 0.6},
               {"name": "phase2", "weights": {"clean": 0.45, "textbook": 0.35, "source": 0.2}}],
    "pretrain": {"model": "tiny", "model_args": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                                                 "num_attention_heads": 4, "num_key_value_heads": 4,
                                                 "max_position_embeddings": 512,
                                                 "original_max_position_embeddings": 512},
                 "seq_len": 256, "batch_size": 16, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 20,
                 "max_steps": 170, "eval_every": 50, "eval_batches": 2, "ckpt_every": 20, "keep_last": 2,
                 "log_every": 1},
    "sft": {"seq_len": 256, "batch_size": 16, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 5, "epochs": 1.5,
            "val_frac": 0.05, "val_max": 100, "eval_every": 20, "ckpt_every": 20, "log_every": 1, "end_eval": 40,
            "end_max_new_tokens": 40},
    "dpo": {"seq_len": 256, "batch_size": 8, "lr": 0.0001, "beta": 0.1, "warmup_steps": 5, "max_steps": 30,
            "val_frac": 0.1, "val_max": 100, "eval_every": 20, "ckpt_every": 20, "log_every": 1},
    "quantize": {"bits": [8, 4], "group_size": 32},
    "eval": {"benchmarks": ["arc_easy", "hellaswag", "mmlu"], "limit": 40, "mmlu_limit": 1, "num_fewshot": 0,
             "data_dir": "auto", "batch_size": 16},
    "samples": {"n": 4, "max_new_tokens": 48},
}

# --smoke: every stage at toy size (tests/test_recipe.py runs it in CI).
SMOKE: dict = {
    "corpus": {"budget_bytes": 150_000, "heldout_max": 3, "heldout_max_bytes": 6_000, "sft_max": 240},
    "tokenizer": {"vocab_size": 512},
    "tokenize": {"val_fraction": 0.1},
    "pretrain": {"model": "tiny", "model_args": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                 "max_position_embeddings": 256,
                                                 "original_max_position_embeddings": 256},
                 "seq_len": 128, "batch_size": 8, "lr": 0.003, "warmup_steps": 5, "max_steps": 30, "eval_every": 10,
                 "ckpt_every": 5, "eval_batches": 1},
    "sft": {"seq_len": 128, "batch_size": 8, "epochs": 1.0, "val_max": 16, "eval_every": 10, "ckpt_every": 5,
            "end_eval": 6, "end_max_new_tokens": 16},
    "dpo": {"seq_len": 128, "batch_size": 4, "max_steps": 6, "val_max": 12, "eval_every": 3, "ckpt_every": 3},
    "eval": {"benchmarks": ["arc_easy"], "limit": 4},
    "samples": {"n": 2, "max_new_tokens": 12},
}

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ----------------------------------------------------------------------------------------------------------------
# Config: defaults < smoke < YAML < flags


def unknown_key(key: str, known: list[str], where: str = "") -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    return UserError(f"unknown recipe key {where + key!r}" + (f"; did you mean {where + close[0]!r}?" if close else
                                                               f"; known keys: {', '.join(known)}"))


def merge(base: dict, over: dict, where: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`. Keys unknown to `base` are errors, except inside the sections passed
    through to a stage's own config (pretrain/sft/dpo and model_args), which check_stage_sections checks."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}{k}"
        if k not in out and where.split(".")[0] not in ("pretrain", "sft", "dpo"):
            raise unknown_key(k, list(out), where)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, f"{path}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(items: list[str]) -> dict:
    """['pretrain.max_steps=600', 'eval.benchmarks=[arc_easy]'] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: use --set section.key=value")
        node = out
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def resolve(args) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if args.smoke:
        cfg = merge(cfg, SMOKE)
    if args.recipe:
        p = Path(args.recipe)
        if not p.is_file():
            raise UserError(f"--recipe {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--recipe {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"--recipe {p} must be a mapping")
        cfg = merge(cfg, data)
    flags = parse_set(args.set)
    if args.data:
        flags["data"] = args.data
    if args.threads is not None:
        flags["threads"] = args.threads
    cfg = merge(cfg, flags)
    if isinstance(cfg["data"], str):
        cfg["data"] = [cfg["data"]]
    check_stage_sections(cfg)
    return cfg


def check_stage_sections(cfg: dict) -> None:
    """Check the pretrain/sft/dpo sections against those stages' config classes (keys and value types) and
    pretrain.model_args against the model's config class, so a typo (pretrain.max_step) fails now, not after six stages."""
    from phiforge import models
    from phiforge.train.config import apply_settings
    from phiforge.train.dpo import DPOConfig
    from phiforge.train.pretrain import PretrainConfig
    from phiforge.train.sft import SFTConfig

    for section, cls in (("pretrain", PretrainConfig), ("sft", SFTConfig), ("dpo", DPOConfig)):
        settings = {str(k).replace("-", "_"): v for k, v in cfg[section].items()}
        known = [f.name for f in dataclasses.fields(cls)]
        for key in settings:
            if key not in known:
                raise unknown_key(key, known, f"{section}.")
        apply_settings(cls(), settings, f"recipe section {section}")  # value types
    known = [f.name for f in dataclasses.fields(models.config_from_name(cfg["pretrain"].get("model", PretrainConfig.model)))]
    for key in cfg["pretrain"].get("model_args") or {}:
        if key not in known:
            raise unknown_key(key, known, "pretrain.model_args.")


# recipe key -> the first stage that reads it: changing it redoes that stage and every later one. threads is absent:
# it changes how fast a stage runs, not what it writes.
FIRST_READER = {"seed": "corpus", "data": "corpus", "corpus": "corpus", "tokenizer": "tokenizer",
                "tokenize": "tokenize", "phases": "pretrain", "pretrain": "pretrain", "sft": "sft", "dpo": "dpo",
                "quantize": "quantize", "eval.benchmarks": "decontam", "eval.data_dir": "decontam", "eval": "eval",
                "samples": "samples"}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys (section or section.key) whose values differ between two resolved recipes."""
    keys = []
    for k in dict.fromkeys([*old, *new]):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{k}.{s}" for s in dict.fromkeys([*a, *b]) if a.get(s) != b.get(s)]
        elif a != b:
            keys.append(k)
    return keys


def check_continuation(out: Path, saved: dict, cfg: dict) -> None:
    """A rerun into an existing run may change only keys no finished stage has read: those stages are kept, and the
    first stage that reads a changed key (not run yet) runs with the new value. Else one line on how to continue."""
    stage_names = [name for name, _ in STAGES]
    changed = changed_keys(saved, cfg)
    done = {name for name in stage_names if (out / ".recipe" / f"{name}.json").exists()}
    used = [(k, FIRST_READER.get(k, FIRST_READER.get(k.split(".")[0]))) for k in changed]
    stale = [(k, s) for k, s in used if s in done]
    if stale:
        keys = ", ".join(f"{k} (read by {s}, done)" for k, s in stale)
        raise UserError(f"{out} was started with a different recipe ({out / 'recipe.yaml'}): {keys}; rerun with the "
                        "saved values to continue it, or choose another --out")
    firsts = sorted({s for _, s in used if s}, key=stage_names.index)
    if changed:
        print(f"recipe: {', '.join(changed)} changed since {out / 'recipe.yaml'} was written; no finished stage read "
              + ("them" if len(changed) > 1 else "it") + ": continuing"
              + (f", {firsts[0]} and later stages use the new values" if firsts else ""), file=sys.stderr)


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
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    return path


def resume_flag(run_dir: Path) -> list[str]:
    from phiforge.train.state import latest_checkpoint
    return ["--resume"] if latest_checkpoint(run_dir) is not None else []


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
    from phiforge.data.io import read_jsonl
    from phiforge.recipe_data import write_jsonl_gz

    eval_sets = [str(ctx.data / "heldout.txt")]
    bench = benchmark_dir(ctx)
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
        write_jsonl_gz(ctx.data / f"{name}.jsonl.gz", kept)
    return out


def stage_filter(ctx: Ctx) -> Path:
    """Stories: `phiforge data filter` (Gopher/C4 heuristics). Code: those prose rules drop nearly every source file
    (symbol and alphabetic-word ratios), so the code analogue is the docstring ratio: files whose module, functions
    and classes mostly carry docstrings (corpus.min_doc_ratio)."""
    from phiforge.data.io import read_jsonl
    from phiforge.recipe_data import write_jsonl_gz

    if not ctx.stories:
        out = ctx.data / "filtered.jsonl.gz"
        docs = list(read_jsonl(ctx.data / "source.jsonl.gz"))
        keep = [d for d in docs if d["doc_ratio"] >= ctx.cfg["corpus"]["min_doc_ratio"]]
        write_jsonl_gz(out, keep)
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


def sources(ctx: Ctx) -> dict[str, Path]:
    """Pretraining sources: name -> documents (decontaminated)."""
    s = {"source": ctx.data / "source.jsonl.gz", "clean": ctx.data / "clean"}
    if (ctx.data / "textbook.jsonl.gz").exists():
        s["textbook"] = ctx.data / "textbook.jsonl.gz"
    return s


def stage_tokenize(ctx: Ctx) -> Path:
    """`phiforge tokenize` once per source (it resumes by itself: finished chunks are kept)."""
    out = ctx.p("tokens")
    for name, inp in sources(ctx).items():
        call(ctx, "tokenize", "phiforge.train.tokenize",
             [str(inp), "--tokenizer", str(ctx.p("tokenizer")), "--out", str(out / name), "--workers", "1",
              "--val-fraction", str(ctx.cfg["tokenize"]["val_fraction"]), "--seed", str(ctx.cfg["seed"])])
    return out


def pretrain_config(ctx: Ctx) -> dict:
    pre = copy.deepcopy(ctx.cfg["pretrain"])
    names = list(sources(ctx))
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
    cfg_path = write_yaml(ctx.p("configs", "pretrain.yaml"), pretrain_config(ctx))
    call(ctx, "pretrain", "phiforge.train.pretrain", ["--config", str(cfg_path)] + resume_flag(run))
    call(ctx, "plot", "phiforge.train.plot", [str(run), "--out", str(run / "loss.png")])
    return run / "final"


def posttrain_config(ctx: Ctx, stage: str) -> dict:
    """The `phiforge sft` / `phiforge dpo` config: the recipe's section plus the paths the recipe owns."""
    model, data = {"sft": (ctx.p("pretrain", "final"), "sft.jsonl"), "dpo": (ctx.p("sft", "final"), "dpo.jsonl")}[stage]
    return {**ctx.cfg[stage], "seed": ctx.cfg["seed"], "out": str(ctx.p(stage)), "model": str(model),
            "data": [str(ctx.data / data)], **ctx.threads_flags()}


def stage_sft(ctx: Ctx) -> Path:
    """`phiforge sft` on the pretrained model; resumes from its last checkpoint after a kill."""
    cfg_path = write_yaml(ctx.p("configs", "sft.yaml"), posttrain_config(ctx, "sft"))
    call(ctx, "sft", "phiforge.train.sft", ["--config", str(cfg_path)] + resume_flag(ctx.p("sft")))
    return ctx.p("sft", "final")


def stage_dpo(ctx: Ctx) -> Path:
    """`phiforge dpo` on the SFT model; its export becomes OUT/final (the model to chat with)."""
    run = ctx.p("dpo")
    cfg_path = write_yaml(ctx.p("configs", "dpo.yaml"), posttrain_config(ctx, "dpo"))
    call(ctx, "dpo", "phiforge.train.dpo", ["--config", str(cfg_path)] + resume_flag(run))
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
        call(ctx, "quantize", "phiforge.quant", [str(ctx.p("final")), "--bits", str(bits), "--group-size",
                                                 str(q["group_size"]), "--out", str(ctx.p("quant", f"int{bits}"))])
    return ctx.p("quant")


def models_for_eval(ctx: Ctx) -> dict[str, Path]:
    """label -> model folder, in the order the report shows them."""
    m = {"pretrain": ctx.p("pretrain", "final"), "sft": ctx.p("sft", "final"), "dpo (final)": ctx.p("final")}
    for bits in ctx.cfg["quantize"]["bits"]:
        m[f"final int{bits}"] = ctx.p("quant", f"int{bits}")
    return m


def benchmark_dir(ctx: Ctx) -> Path | None:
    d = ctx.cfg["eval"]["data_dir"]
    if d in (None, "", "none"):
        return None
    if d == "auto":
        s = shared_dir()
        return s / "data" if s is not None and (s / "data").is_dir() else None
    if not Path(d).is_dir():
        raise UserError(f"eval.data_dir {d} is not a folder")
    return Path(d)


def stage_eval(ctx: Ctx) -> Path:
    """`phiforge perplexity` of the held-out text under every model (pretrain, SFT, final fp32/int8/int4; the
    quantized ones also get KL against the fp32 final model), plus benchmark subsets of the final model with
    `phiforge eval` when benchmark data is available. Each result file is its own resume point."""
    e = ctx.cfg["eval"]
    out = ctx.p("eval")
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(ctx.cfg["threads"])] if ctx.cfg["threads"] else []
    for label, folder in models_for_eval(ctx).items():
        res = out / f"ppl_{slug(label)}.json"
        if res.exists():
            continue
        ref = ["--reference", str(ctx.p("final"))] if label.startswith("final int") else []
        call(ctx, "perplexity", "phiforge.perplexity",
             [str(folder), "--data", str(ctx.data / "heldout.txt"), *ref, "--json", str(res), *threads])
    bench = benchmark_dir(ctx)
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


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


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
    """OUT/report.md + report.json + PNGs (loss curves, evaluation table, perplexity against bits)."""
    rep = ctx.p("report")
    rep.mkdir(parents=True, exist_ok=True)
    m = collect_metrics(ctx)
    timings = {}  # stage -> [wall seconds, CPU seconds of this process, all threads]
    for name, _ in STAGES:
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


# ----------------------------------------------------------------------------------------------------------------
# The report: numbers (report.json "metrics": identical on a resumed run), plots, markdown


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect_metrics(ctx: Ctx) -> dict:
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
    for name in sources(ctx):
        meta = _json(ctx.p("tokens", name, "meta.json"))
        m["tokens"][name] = {"train": meta.get("train", {}).get("tokens"), "val": meta.get("val", {}).get("tokens"),
                             "docs": meta.get("train", {}).get("docs")}
    hf = _json(ctx.p("pretrain", "final", "config.json"))
    if hf:
        mc = models.config_from_hf(hf)
        m["model"] = {"parameters": mc.num_params(), "hidden_size": mc.hidden_size, "layers": mc.num_hidden_layers,
                      "heads": mc.num_attention_heads, "vocab_size": mc.vocab_size}
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
    for label in models_for_eval(ctx):
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


def plot_losses(ctx: Ctx, path: Path) -> None:
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
    ax = axes[1]
    recs = _jsonl(ctx.p("sft", "metrics.jsonl"))
    tr, va = [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], marker="o", ms=3, label="held-out")
    ax.set(title="SFT (assistant tokens)", xlabel="step", ylabel="loss (nats/token)")
    ax = axes[2]
    recs = _jsonl(ctx.p("dpo", "metrics.jsonl"))
    tr, va = [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], marker="o", ms=3, label="held-out loss")
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


def render_report(ctx: Ctx, m: dict, rows, timings: dict) -> str:
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
        L += ["", f"Model: Phi-3 architecture, {mm['parameters'] / 1e6:.2f}M parameters ({mm['layers']} layers, "
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
    if benchmark_dir(ctx) is None:
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


STAGES = [("corpus", stage_corpus), ("decontam", stage_decontam), ("filter", stage_filter), ("dedup", stage_dedup),
          ("tokenizer", stage_tokenizer),
          ("tokenize", stage_tokenize), ("pretrain", stage_pretrain), ("sft", stage_sft), ("dpo", stage_dpo),
          ("quantize", stage_quantize), ("eval", stage_eval), ("samples", stage_samples), ("report", stage_report)]


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/default", help="run directory (a rerun continues it)")
    ap.add_argument("--recipe", help="YAML overriding the embedded defaults (see recipes/default.yaml)")
    ap.add_argument("--data", nargs="+", help="TinyStories-style text files or folders: a story model instead of "
                    "the standard-library code model")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: every stage runs, in well under 3 minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the training stages")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one recipe value, e.g. --set pretrain.max_steps=600 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="stage output only to OUT/logs/, not the console")
    ap.add_argument("--until", choices=[name for name, _ in STAGES], help="stop after this stage")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    args = ap.parse_args(argv)

    cfg = resolve(args)
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)
    if args.print_config:
        print(text, end="")
        return 0
    out = check_writable(args.out, "dir")
    saved = out / "recipe.yaml"
    if saved.exists():
        check_continuation(out, yaml.safe_load(saved.read_text()), cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, text)
    print(text, end="", file=sys.stderr)
    ctx = Ctx(cfg, out, verbose=not args.quiet)
    t_start = time.time()
    for i, (name, fn) in enumerate(STAGES, 1):
        marker = out / ".recipe" / f"{name}.json"
        head = f"[recipe {i:2d}/{len(STAGES)}] {name:<9}"
        if marker.exists():
            print(f"{head} skipped: done earlier ({json.loads(marker.read_text())['output']})", file=sys.stderr)
            continue
        print(f"{head} running ... (log: {out / 'logs'})", file=sys.stderr, flush=True)
        for later, _ in STAGES[i:]:  # a stage that runs again invalidates everything after it
            (out / ".recipe" / f"{later}.json").unlink(missing_ok=True)
        t0, c0 = time.time(), time.process_time()
        try:
            output = fn(ctx)
        except BaseException:
            print(f"{head} FAILED after {time.time() - t0:.1f}s; to continue from here, rerun the same command, or "
                  f"one that changes only settings {name} and later stages read", file=sys.stderr, flush=True)
            raise
        dt = time.time() - t0
        atomic_write_json(marker, {"stage": name, "output": str(output), "seconds": round(dt, 2),
                                   "cpu_seconds": round(time.process_time() - c0, 2)})
        print(f"{head} done in {dt:6.1f}s (recipe {time.time() - t_start:6.1f}s) -> {output}", file=sys.stderr,
              flush=True)
        if name == args.until:
            print(f"stopped after {name} (--until); rerun without --until to continue", file=sys.stderr)
            return 0
    print(f"report: {out / 'report.md'}")
    print(f"chat with it: phiforge chat {out / 'final'}")
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))
