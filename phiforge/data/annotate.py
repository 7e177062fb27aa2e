"""LLM annotation: score a sample of documents 0-5 for educational value through an OpenAI-compatible endpoint.

    phiforge serve runs/teacher --port 8000 &
    phiforge data annotate runs/data/dedup --out runs/data/labels --sample 0.02 --base-url http://127.0.0.1:8000/v1
    phiforge data train-classifier runs/data/labels --out runs/data/clf

The prompt (phiforge/assets/data/annotate_edu_prompt.txt, or --prompt FILE with a {text} slot) is the additive
0-5 educational-value rubric of FineWeb-Edu (Penedo et al. 2024), the public stand-in for the Phi-3 report's
LLM-based filtering. A document is sampled iff a hash of (seed, id) falls below --sample, so the sample does not
depend on sharding. Replies whose score cannot be parsed are counted ("unparsed") and dropped.
Requests that still fail after the retries stop the stage with an error; answered ones are cached, so the
rerun resumes where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from phiforge.client import RequestFailed, add_client_args, client_from_args, gen_params
from phiforge.utils import ArgumentParser, UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
SCORE_RE = re.compile(r"educational score:\s*\**\s*([0-5])", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    m = SCORE_RE.findall(reply)
    return int(m[-1]) if m else None  # the last one: the rubric asks to conclude with it


def sampled(doc_id: str, rate: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < rate


def load_template(path: str | None) -> str:
    p = Path(path) if path else ASSETS / "annotate_edu_prompt.txt"
    if not p.exists():
        raise UserError(f"{p}: prompt template not found")
    t = p.read_text(encoding="utf-8")
    if "{text}" not in t:
        raise UserError(f"{p}: the prompt template needs a {{text}} slot for the document")
    return t


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from phiforge.data.io import add_io_args, run_units

    ap = ArgumentParser(prog="phiforge data annotate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(ap)
    add_client_args(ap)
    ap.add_argument("--sample", type=float, default=1.0, help="fraction of documents to annotate (by id hash)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=None, help="prompt template file with a {text} slot")
    ap.add_argument("--max-chars", type=int, default=6000, help="truncate documents to this many characters")
    args = ap.parse_args(argv)
    template = load_template(args.prompt)
    out = Path(args.out)
    client = client_from_args(args, out / ".responses.cache")
    params = gen_params(args)

    def process(unit: int, docs: list[dict], stats) -> list[dict]:
        docs = [d for d in docs if sampled(d["id"], args.sample, args.seed)]
        stats.remove("not_sampled", stats.docs_in - len(docs))
        replies = list(client.map([template.replace("{text}", d["text"][:args.max_chars]) for d in docs], **params))
        failed = [r for r in replies if isinstance(r, RequestFailed)]
        if failed:
            raise UserError(f"{len(failed)} annotation requests failed ({failed[0]}); answered ones are cached: "
                            "rerun the same command to resume")
        kept, scores = [], []
        for d, reply in zip(docs, replies):
            s = parse_score(reply)
            if s is None:
                stats.remove("unparsed_reply")
                continue
            scores.append(s)
            kept.append({"id": d["id"], "text": d["text"], "score": s, "judge": reply})
        if scores:
            stats.add_hist("edu_score", np.array(scores), np.arange(-0.5, 6.0, 1.0))
        return kept

    try:
        stats = run_units("annotate", args.inputs, out, process, rank=args.rank, world=args.world,
                          shard_size=args.shard_size, text_key=args.text_key, text_sep=args.text_sep,
                          config={"sample": args.sample, "seed": args.seed, "model": args.model})
    finally:
        client.close()
    if stats:
        print(f"annotate: {stats.docs_out} documents scored; client {client.stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
