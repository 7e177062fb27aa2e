"""Synthetic data: TinyStories-style stories and textbook-style lessons written by a teacher model.

    phiforge data synth --recipe tinystories --n 20000 --out runs/data/stories --base-url http://127.0.0.1:8000/v1
    phiforge data synth --recipe textbook --n 5000 --out runs/data/textbooks --seed 1
    phiforge data dedup runs/data/stories --out runs/data/stories_dedup       # near-duplicates across the run

TinyStories (Eldan & Li 2023, arXiv:2305.07759 section 2): each prompt draws one noun, verb and adjective from
simple word lists and 1-2 story features (dialogue, twist, moral, ...), which is what makes the stories diverse.
Textbook (phi-1, Gunasekar et al. 2023, arXiv:2306.11644): topic x audience x style. Word lists, grids and prompt
templates are data files in phiforge/assets/data/ (override with --words / --template).

Prompt i depends only on (seed, recipe, i), so a run is reproducible and splits into units of --shard-size prompts
exactly like the other stages: finished units are skipped, a killed run redoes only its open unit, and answered
requests come from the cache. Replies are filtered (too short, refusals, Gopher repetition) and exact duplicates
within a unit dropped; run `data dedup` over the whole output for near-duplicates across units.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

from phiforge.client import RequestFailed, add_client_args, client_from_args, gen_params
from phiforge.data.dedup import exact_hash, word_hashes
from phiforge.data.filters import FilterConfig, gopher_repetition
from phiforge.data.io import Stats, done_path, finalize, shard_path, write_jsonl
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, check_writable

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
DEFAULTS = {"tinystories": ("tinystories_words.json", "tinystories_prompt.txt"),
            "textbook": ("textbook_topics.json", "textbook_prompt.txt")}
REFUSALS = ("i'm sorry", "i am sorry", "i cannot", "i can't", "as an ai")


def load_recipe(recipe: str, words: str | None, template: str | None) -> tuple[dict, str]:
    if recipe not in DEFAULTS:
        raise UserError(f"--recipe {recipe!r}: use one of {', '.join(DEFAULTS)}")
    wpath = Path(words) if words else ASSETS / DEFAULTS[recipe][0]
    tpath = Path(template) if template else ASSETS / DEFAULTS[recipe][1]
    for p in (wpath, tpath):
        if not p.exists():
            raise UserError(f"{p}: not found")
    try:
        table = json.loads(wpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{wpath}: not valid JSON ({e})") from None
    need = (("nouns", "verbs", "adjectives", "features") if recipe == "tinystories"
            else ("topics", "audiences", "styles"))
    missing = [k for k in need if not table.get(k)]
    if missing:
        raise UserError(f"{wpath}: missing or empty lists {missing}")
    return table, tpath.read_text(encoding="utf-8")


def make_prompt(recipe: str, table: dict, template: str, seed: int, i: int) -> tuple[str, dict]:
    """Prompt number i and the choices behind it; a function of (seed, recipe, i) only."""
    rng = random.Random(f"{seed}:{recipe}:{i}")
    if recipe == "tinystories":
        feats = rng.sample(sorted(table["features"]), rng.randint(1, 2))
        meta = {"noun": rng.choice(table["nouns"]), "verb": rng.choice(table["verbs"]),
                "adjective": rng.choice(table["adjectives"]), "features": feats}
        slots = {**meta, "features": "; ".join(table["features"][f] for f in feats)}
    else:
        meta = {k: rng.choice(table[k + "s"]) for k in ("topic", "audience", "style")}
        slots = meta
    prompt = template
    for k, v in slots.items():
        prompt = prompt.replace("{" + k + "}", str(v))
    return prompt.strip(), meta


def reject_reason(text: str, min_words: int) -> str | None:
    if len(text.split()) < min_words:
        return "too_short"
    if text.lower().lstrip().startswith(REFUSALS):
        return "refusal"
    return gopher_repetition(text, FilterConfig())


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge data synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--n", type=int, required=True, help="number of prompts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--words", default=None, help="word list / topic grid JSON (default: the recipe's asset)")
    ap.add_argument("--template", default=None, help="prompt template with {slots} (default: the recipe's asset)")
    ap.add_argument("--min-words", type=int, default=40, help="drop replies shorter than this")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    add_client_args(ap)
    args = ap.parse_args(argv)
    if args.n < 1 or args.shard_size < 1 or not 0 <= args.rank < args.world:
        raise UserError("need --n >= 1, --shard-size >= 1 and 0 <= --rank < --world")
    table, template = load_recipe(args.recipe, args.words, args.template)
    out = check_writable(args.out, "dir")  # before the first (paid) teacher request
    (out / ".done").mkdir(parents=True, exist_ok=True)
    client = client_from_args(args, out / ".responses.cache")
    params = gen_params(args)
    n_units = (args.n + args.shard_size - 1) // args.shard_size
    from tqdm import tqdm

    bar = tqdm(total=args.n, desc=f"synth {args.recipe}", unit="doc", file=sys.stderr,
               disable=os.environ.get("PHIFORGE_NO_PROGRESS") == "1")
    try:
        for unit in range(n_units):
            ids = range(unit * args.shard_size, min(args.n, (unit + 1) * args.shard_size))
            if unit % args.world != args.rank or done_path(out, unit).exists():
                continue
            t0 = time.perf_counter()
            stats = Stats(docs_in=len(ids))
            prompts = [make_prompt(args.recipe, table, template, args.seed, i) for i in ids]
            replies = list(client.map([p for p, _ in prompts], **params))
            failed = [r for r in replies if isinstance(r, RequestFailed)]
            if failed:
                raise UserError(f"{len(failed)} teacher requests failed ({failed[0]}); answered ones are cached: "
                                "rerun the same command to resume")
            kept, seen, lengths = [], set(), []
            for i, (prompt, meta), reply in zip(ids, prompts, replies):
                text = reply.strip()
                reason = reject_reason(text, args.min_words)
                h = exact_hash(word_hashes(text))
                if reason is None and h in seen:
                    reason = "exact_duplicate"
                if reason:
                    stats.remove(reason)
                    continue
                seen.add(h)
                lengths.append(len(text.split()))
                kept.append({"id": f"{args.recipe}-{args.seed}-{i}", "text": text, "recipe": args.recipe, **meta})
            if lengths:
                stats.add_hist("words_per_doc", np.array(lengths), np.linspace(0, 1000, 41))
            stats.docs_out = len(kept)
            write_jsonl(shard_path(out, unit), kept)
            stats.seconds = time.perf_counter() - t0
            atomic_write_json(done_path(out, unit), stats.to_json())
            bar.update(len(ids))
    finally:
        bar.close()
        client.close()
    total = finalize("synth", out, n_units, {"recipe": args.recipe, "n": args.n, "seed": args.seed,
                                             "model": args.model})
    if total:
        print(f"synth: kept {total.docs_out}/{total.docs_in}; removed {total.removed}; client {client.stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
