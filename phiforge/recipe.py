"""`phiforge recipe`: the whole Phi-3 recipe in one command, resumable, with a report.

    phiforge recipe --out runs/default                        # the embedded default: a stdlib "code textbook" model
    phiforge recipe --smoke --out runs/smoke                  # every stage at toy size (CI, < 3 minutes)
    phiforge recipe --data ../shared/data/tinystories --out runs/stories      # the same recipe on stories
    phiforge recipe --recipe recipes/default.yaml --set pretrain.max_steps=600 --out runs/longer

Stages, each reading the previous one's output (docs/recipe.md):
  corpus -> decontam -> filter -> dedup -> tokenizer -> tokenize -> pretrain (two phases) -> sft -> dpo -> quantize
  -> eval -> samples -> report
A stage is skipped when its done-marker (OUT/.recipe/<stage>.json, written atomically after the stage's output is
complete) exists and the output it names still does, so rerunning a killed run continues it; a killed pretrain/sft/dpo resumes from its last checkpoint.

Config precedence: recipes/default.yaml (the only copy of the defaults) < recipes/smoke.yaml (with --smoke) <
--recipe FILE < --arch moe < --data / --threads / --set section.key=value flags (the override syntax of every command,
phiforge/train/config.py). The resolved recipe is printed and saved as OUT/recipe.yaml; a rerun into the
same OUT may change only keys that no finished stage read (a run that failed at pretraining takes a corrected
pretrain.* key). The `pretrain`, `sft` and `dpo` sections are passed through as those stages' own YAML configs, so
any of their keys (phiforge pretrain/sft/dpo --help) can be set there; they are checked before any stage runs, and
those stages run in this process on the config objects the recipe builds.

This file: the config and the runner (skip, resume, continuation checks). The stages: phiforge/recipe_stages.py;
the report: phiforge/recipe_report.py.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from phiforge.recipe_stages import STAGES, Ctx, posttrain_config, pretrain_config, write_yaml  # noqa: F401 (API)
from phiforge.train.config import apply_settings, dump_yaml, load_yaml, nest, parse_set, unknown_key
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, atomic_write_text, check_writable

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data; the source tree's recipes/ links here


def _recipe_file(name: str) -> dict | None:
    """recipes/<name>.yaml, the one copy of the defaults (None where an install lost its package data)."""
    p = RECIPES_DIR / f"{name}.yaml"
    return yaml.safe_load(p.read_text()) if p.is_file() else None


DEFAULTS: dict | None = _recipe_file("default")  # the embedded default: `phiforge recipe --out runs/default`
SMOKE: dict | None = _recipe_file("smoke")  # --smoke: every stage at toy size (tests/test_recipe.py runs it in CI)


# ----------------------------------------------------------------------------------------------------------------
# Config: defaults < smoke < YAML < flags


def merge(base: dict, over: dict, where: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`. Keys unknown to `base` are errors, except inside the sections passed
    through to a stage's own config (pretrain/sft/dpo and model_args), which check_stage_sections checks."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}{k}"
        if k not in out and where.split(".")[0] not in ("pretrain", "sft", "dpo"):
            raise unknown_key(k, list(out), "", where, "recipe")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v, f"{path}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve(args) -> dict:
    if DEFAULTS is None:
        raise UserError(f"{RECIPES_DIR / 'default.yaml'} is missing: phiforge recipe reads its defaults from "
                        "phiforge/recipes/, installed with the package; reinstall phiforge")
    cfg = copy.deepcopy(DEFAULTS)
    if args.smoke:
        cfg = merge(cfg, SMOKE)
    if args.recipe:
        cfg = merge(cfg, load_yaml(args.recipe, "--recipe"))
    if args.arch == "moe":
        cfg = merge(cfg, moe_overlay(cfg))
    flags = nest(parse_set(args.set))
    if args.data:
        flags["data"] = args.data
    if args.threads is not None:
        flags["threads"] = args.threads
    cfg = merge(cfg, flags)
    if isinstance(cfg["data"], str):
        cfg["data"] = [cfg["data"]]
    check_stage_sections(cfg)
    return cfg


def moe_overlay(cfg: dict, experts: int = 4) -> dict:
    """--arch moe: the same model as a PhiMoE (phi-3.5-MoE's architecture) with `experts` experts, each half as
    wide as the dense FFN, so that top-2 routing makes the *active* parameters per token those of the dense model
    (the comparison the report makes). --set pretrain.model_args.* still overrides (flags come later)."""
    args = dict(cfg["pretrain"].get("model_args") or {})
    dense_ffn = args.get("intermediate_size") or 704
    return {"pretrain": {"model": "tiny-moe",
                         "model_args": {**args, "intermediate_size": dense_ffn // 2, "num_local_experts": experts}}}


def check_stage_sections(cfg: dict) -> None:
    """Check the pretrain/sft/dpo sections against those stages' config classes (keys and value types) and
    pretrain.model_args against the model's config class, so a typo (pretrain.max_step) fails now, not after six stages."""
    from phiforge import models
    from phiforge.train.dpo import DPOConfig
    from phiforge.train.pretrain import PretrainConfig
    from phiforge.train.sft import SFTConfig

    for section, cls in (("pretrain", PretrainConfig), ("sft", SFTConfig), ("dpo", DPOConfig)):
        settings = {str(k).replace("-", "_"): v for k, v in cfg[section].items()}
        known = [f.name for f in dataclasses.fields(cls)]
        for key in settings:
            if key not in known:
                raise unknown_key(key, known, "", f"{section}.", "recipe")
        apply_settings(cls(), settings, f"recipe section {section}")  # value types
    known = [f.name for f in dataclasses.fields(models.config_from_name(cfg["pretrain"].get("model", PretrainConfig.model)))]
    for key in cfg["pretrain"].get("model_args") or {}:
        if key not in known:
            raise unknown_key(key, known, "", "pretrain.model_args.", "recipe")


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


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="phiforge recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/default", help="run directory (a rerun continues it)")
    ap.add_argument("--recipe", "--config", dest="recipe",
                    help="YAML over the defaults (a copy of recipes/default.yaml, edited)")
    ap.add_argument("--data", nargs="+", help="TinyStories-style text files or folders: a story model instead of "
                    "the standard-library code model")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: every stage runs, in well under 3 minutes")
    ap.add_argument("--arch", choices=("dense", "moe"), default="dense",
                    help="dense: Phi-3 (phi-3-mini's architecture); moe: PhiMoE (phi-3.5-MoE's: 4 top-2 experts of "
                         "half the FFN width, the same active parameters)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the training stages")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one recipe value, e.g. --set pretrain.max_steps=600 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="stage output only to OUT/logs/, not the console")
    ap.add_argument("--until", choices=[name for name, _ in STAGES], help="stop after this stage")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    cfg = resolve(args)
    text = dump_yaml(cfg)
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
            done_output = json.loads(marker.read_text())["output"]
            if Path(done_output).exists():
                print(f"{head} skipped: done earlier ({done_output})", file=sys.stderr)
                continue
            # its output was deleted since (say, report.md to redo the report): run the stage again
            print(f"{head} done earlier, but {done_output} is gone: running it again", file=sys.stderr)
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
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
