"""`phiforge data <stage> ...`: run one stage, or `phiforge data run RECIPE` to chain them.

    phiforge data filter ../shared/data/web --out runs/data/filter
    phiforge data run my_data_recipe.yaml         # a recipe file as below

A recipe (YAML or JSON) names an output root and a list of stages; each stage reads the previous stage's output
unless it gives `inputs`, writes to <out>/<i>_<stage>, and gets `args` as --flags (lists expand, true = flag).
Rerunning a recipe skips finished units of every stage, so it resumes after a kill. A report closes the run.
`--set key=value` after the file overrides a top-level key (`--set out=runs/data2`), as on every phiforge command.

    out: runs/data
    stages:
      - {stage: filter, inputs: [../shared/data/web]}
      - {stage: dedup}
      - {stage: decontam, args: {eval-sets: [../shared/data/gsm8k/gsm8k_test.jsonl]}}
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from phiforge.utils import UserError

# stage -> (module, function, one-line help)
STAGES = {
    "filter": ("phiforge.data.filters", "main", "Gopher quality/repetition, C4 lines, length and symbol ratios"),
    "dedup": ("phiforge.data.dedup", "main", "exact + MinHash LSH near-duplicate removal"),
    "annotate": ("phiforge.data.annotate", "main", "LLM educational-value labels via an OpenAI-compatible API"),
    "train-classifier": ("phiforge.data.classify", "train_main", "train the fast quality classifier on labels"),
    "score": ("phiforge.data.classify", "score_main", "score documents with the classifier, keep above threshold"),
    "decontam": ("phiforge.data.decontam", "main", "13-gram overlap against evaluation sets"),
    "synth": ("phiforge.data.synth", "main", "TinyStories / textbook synthetic data from a teacher"),
    "report": ("phiforge.data.report", "main", "counts, removal reasons, throughput, histogram PNGs"),
    "run": ("phiforge.data.cli", "run_recipe", "chain stages from a recipe file"),
}
NO_INPUT = {"synth"}


def usage() -> str:
    lines = ["usage: phiforge data <stage> [options]", "", "stages:"]
    lines += [f"  {k:<17} {h}" for k, (_, _, h) in STAGES.items()]
    return "\n".join(lines)


def stage_argv(args: dict) -> list[str]:
    argv = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, list):
            argv += [flag] + [str(x) for x in v]
        else:
            argv += [flag, str(v)]
    return argv


def run_recipe(argv: list[str] | None = None) -> int:
    """`phiforge data run RECIPE [--set key=value ...]`: the recipe file read like every phiforge config
    (train/config.py: YAML, then --set overrides of its top-level keys, e.g. --set out=runs/data2)."""
    from phiforge.train.config import load_yaml, nest, parse_set

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path, rest = Path(argv[0]), argv[1:]
    sets = [v for flag, v in zip(rest[::2], rest[1::2]) if flag == "--set"]
    if len(rest) % 2 or len(sets) != len(rest) // 2:
        raise UserError(f"phiforge data run {path}: after the recipe file only --set key=value flags, got {rest}")
    recipe = {**load_yaml(path, "data recipe"), **nest(parse_set(sets))}
    if "out" not in recipe or not isinstance(recipe.get("stages"), list):
        raise UserError(f"{path}: a recipe needs `out:` and a list `stages:`")
    root = Path(recipe["out"])
    prev: list[str] | None = None
    folders = []
    for i, st in enumerate(recipe["stages"]):
        name = st.get("stage") if isinstance(st, dict) else None
        if name not in STAGES or name in ("run", "report"):
            raise UserError(f"{path}: stage {i}: unknown stage {name!r}; use one of {', '.join(STAGES)}")
        out = root / f"{i}_{name}"
        inputs = st.get("inputs", prev)
        if name not in NO_INPUT and not inputs:
            raise UserError(f"{path}: stage {i} ({name}) has no inputs and no previous stage")
        sub = ([] if name in NO_INPUT else [str(x) for x in inputs]) + (st.get("argv") or [])
        sub += ["--out", str(out)] + stage_argv(st.get("args", {}))
        print(f"[recipe] {name}: {' '.join(sub)}", file=sys.stderr)
        rc = dispatch([name] + sub)
        if rc:
            return rc
        prev = [str(out)]
        folders.append(str(out))
    return dispatch(["report", *folders, "--out", str(root)])


def dispatch(argv: list[str]) -> int:
    mod, fn, _ = STAGES[argv[0]]
    return int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in STAGES:
        from phiforge.utils import did_you_mean

        # `classify` was the README's name for the classifier stages
        hint = " (did you mean train-classifier or score?)" if argv[0] == "classify" else did_you_mean(argv[0], STAGES)
        raise UserError(f"unknown data stage {argv[0]!r}{hint}; use one of {', '.join(STAGES)}")
    return dispatch(argv)


if __name__ == "__main__":
    from phiforge.utils import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
