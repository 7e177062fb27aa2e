"""Readers for the local benchmark files (formats in ../shared/data/SOURCES.md), with errors that name the file
and record. Every task module reads its data through these."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from phiforge.data import io as data_io
from phiforge.data.io import open_text
from phiforge.utils import UserError


def find(data_dir: str | Path, rel: str) -> Path:
    """data_dir/rel, or a UserError naming the missing file."""
    p = Path(data_dir) / rel
    if not p.exists():
        raise UserError(f"missing data file {p}; point --data-dir at a folder laid out like ../shared/data "
                        f"(see ../shared/data/SOURCES.md)")
    return p


def _open(p: Path):
    return open_text(p, newline=None)


def read_jsonl(p: Path) -> list[dict]:
    return list(data_io.read_jsonl(p))


def read_json(p: Path):
    with _open(p) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON in {p}: {e}") from None


def read_csv(p: Path) -> list[list[str]]:
    with _open(p) as f:
        return list(csv.reader(f))


def require(rec, keys: dict, where: str) -> None:
    """Check that record `rec` has each key with the given type: UserError naming the record otherwise."""
    if not isinstance(rec, dict):
        raise UserError(f"malformed record {where}: expected an object, got {type(rec).__name__}")
    for k, typ in keys.items():
        if k not in rec:
            raise UserError(f"malformed record {where}: missing field {k!r}")
        if not isinstance(rec[k], typ):
            want = typ.__name__ if isinstance(typ, type) else typ
            raise UserError(f"malformed record {where}: field {k!r} should be {want}, "
                            f"got {type(rec[k]).__name__}")


def check_gold(gold, n: int, where: str) -> int:
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise UserError(f"malformed record {where}: gold {gold!r} is not an index into {n} choices")
    return gold


def sample_fewshot(docs: list[dict], i: int, k: int, seed: int) -> list[dict]:
    """k few-shot docs from the evaluation split itself, never doc i (lm-eval's rule when the few-shot split is
    the test split). Used only by tasks whose local data has no separate few-shot split."""
    rnd = random.Random(seed + i)
    pool = [j for j in range(len(docs)) if j != i]
    return [docs[j] for j in rnd.sample(pool, min(k, len(pool)))]


def mc_doc(i: int, query: str, choices: list[str], gold: int, shots: list[tuple[str, str]] = (),
           description: str = "", delim: str = " ", **extra) -> dict:
    """One lm-eval multiple-choice item: context = description + few-shot turns (q + delim + answer + "\\n\\n")
    + query; one (context, delim + choice) request per choice (lm-eval `fewshot_context`/`construct_requests`)."""
    ctx = description + "".join(f"{q}{delim}{a}\n\n" for q, a in shots) + query
    return {"id": i, "pairs": [(ctx, delim + c) for c in choices], "choice_lens": [len(c) for c in choices],
            "gold": gold, **extra}


def jsonl_mc(data_dir, rel: str, to_query, num_fewshot: int, seed: int) -> list[dict]:
    """The MosaicML {query, choices, gold} files: `to_query(query)` rebuilds lm-eval's prompt."""
    p = find(data_dir, rel)
    raw = read_jsonl(p)
    items = []
    for n, r in enumerate(raw, 1):
        where = f"{p} line {n}"
        require(r, {"query": str, "choices": list, "gold": int}, where)
        items.append((to_query(r["query"], where), r["choices"], check_gold(r["gold"], len(r["choices"]), where)))
    docs = []
    for i, (q, choices, gold) in enumerate(items):
        shots = [(s[0], s[1][s[2]]) for s in sample_fewshot(items, i, num_fewshot, seed)] if num_fewshot else []
        docs.append(mc_doc(i, q, choices, gold, shots))
    return docs


def strip_prefix(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise UserError(f"malformed record {where}: query should start with {prefix!r}")
    return text[len(prefix):]
