"""Decontamination: drop (or only report) documents sharing a word 13-gram with an evaluation set.

    phiforge data decontam runs/data/scored --out runs/data/clean \\
        --eval-sets ../shared/data/gsm8k/gsm8k_test.jsonl ../shared/data/mmlu/test
    phiforge data decontam IN --out OUT --eval-sets EVAL... --report-only

13-gram overlap on normalized words is the test of GPT-3 (Brown et al. 2020, appendix C) and the Phi-3 report's
decontamination. Evaluation files: jsonl(.gz) / json (every string value of a record, each value on its own so
n-grams never span two fields), csv (every cell), txt (every line); folders are searched for those. Strings
shorter than n words contribute their whole word sequence as one shorter n-gram only when it has >= --min-words
words, so short answers like "Paris" never match.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np

from phiforge.data.dedup import word_hashes
from phiforge.data.io import expand_files, open_text
from phiforge.utils import ArgumentParser, UserError

EVAL_EXT = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".txt", ".txt.gz")
MUL = np.uint64(0x9E3779B97F4A7C15)


def gram_keys(h: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per word n-gram (a position-weighted mix of word hashes)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            key = key * MUL + h[k:k + m]
    return key


def strings_of(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings_of(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_of(v)]
    return []


def eval_strings(path: Path) -> list[str]:
    with open_text(path) as f:
        text = f.read()
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        out = []
        for line in text.splitlines():
            try:
                out += strings_of(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
    if name.endswith(".json"):
        try:
            return strings_of(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    if name.endswith(".csv"):
        csv.field_size_limit(1 << 30)
        return [c for row in csv.reader(io.StringIO(text)) for c in row]
    return text.splitlines()


def build_index(paths: list[str], n: int, min_words: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(sorted n-gram keys, eval-set number of each key, eval-set names)."""
    files = expand_files(paths, EVAL_EXT, what="--eval-sets", check_suffix=False)
    if not files:
        raise UserError(f"--eval-sets {paths}: no {', '.join(EVAL_EXT)} files found")
    keys, owner = [], []
    for j, f in enumerate(files):
        for s in eval_strings(f):
            h = word_hashes(s)
            k = gram_keys(h, n) if len(h) >= n else (gram_keys(h, len(h)) if len(h) >= min_words else None)
            if k is not None and len(k):
                keys.append(k)
                owner.append(np.full(len(k), j, dtype=np.int32))
    if not keys:
        raise UserError(f"--eval-sets: no text with >= {min_words} words found in {paths}")
    keys_a, owner_a = np.concatenate(keys), np.concatenate(owner)
    order = np.argsort(keys_a, kind="stable")
    return keys_a[order], owner_a[order], [str(f) for f in files]


def matches(text: str, index: np.ndarray, n: int, min_words: int) -> np.ndarray:
    """Positions in the sorted index of every n-gram of the text that an eval set also has."""
    h = word_hashes(text)
    # short eval strings were indexed as shorter grams; check every length they could have
    grams = [gram_keys(h, n)] + [gram_keys(h, m) for m in range(min_words, n)]
    g = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
    pos = np.searchsorted(index, g)
    pos = np.minimum(pos, len(index) - 1)
    return pos[index[pos] == g]


def main(argv: list[str] | None = None) -> int:
    from phiforge.data.io import add_io_args, run_units

    ap = ArgumentParser(prog="phiforge data decontam", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(ap)
    ap.add_argument("--eval-sets", nargs="+", required=True, help="evaluation files or folders")
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--min-words", type=int, default=8, help="shortest eval string that still counts")
    ap.add_argument("--report-only", action="store_true", help="keep everything, only count overlaps")
    args = ap.parse_args(argv)
    index, owner, names = build_index(args.eval_sets, args.ngram, args.min_words)

    def process(unit: int, docs: list[dict], stats) -> list[dict]:
        kept = []
        for d in docs:
            hit = matches(d["text"], index, args.ngram, args.min_words)
            if len(hit):
                for j in np.unique(owner[hit]):
                    key = f"contaminated_by.{Path(names[j]).name}"
                    stats.extra[key] = stats.extra.get(key, 0) + 1
                if len(stats.extra.get("contaminated_ids", [])) < 20:
                    stats.extra.setdefault("contaminated_ids", []).append(d["id"])
                if not args.report_only:
                    stats.remove("eval_overlap")
                    continue
                stats.extra["overlapping_kept"] = stats.extra.get("overlapping_kept", 0) + 1
            kept.append(d)
        return kept

    stats = run_units("decontam", args.inputs, args.out, process, rank=args.rank, world=args.world,
                      shard_size=args.shard_size, text_key=args.text_key, text_sep=args.text_sep,
                      config={"eval_sets": names, "ngram": args.ngram, "report_only": args.report_only})
    if stats:
        hits = {k: v for k, v in stats.extra.items() if k.startswith("contaminated_by.")}
        print(f"decontam: kept {stats.docs_out}/{stats.docs_in}; overlaps {hits}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
