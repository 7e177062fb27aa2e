"""Documents/s of heuristic filtering + MinHash dedup: phiforge vs datatrove's equivalent pipeline, same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data.py [--repeat 2]

Input: every document of ../shared/data/web (the two C4 jsonl files, the Wikipedia text file one article per
line), written once to a temporary jsonl.gz that both pipelines read. Both run single-process, with file I/O:
  phiforge:  data filter (Gopher repetition + Gopher quality + C4 + ratios) -> data dedup (exact + MinHash LSH)
  datatrove: JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter -> JsonlWriter, then
             MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster -> MinhashDedupFilter -> writer
             (LocalPipelineExecutor, 1 task, 1 worker; datatrove's default English word tokenizer, spaCy).
Each pipeline first runs once on 20 documents so that imports and tokenizer loading are not timed.
--repeat N concatenates the input N times (more documents, more exact duplicates for both).
The last line is the ratio of documents/s (phiforge / datatrove).
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PHIFORGE_NO_PROGRESS", "1")

from phiforge.utils import shared_dir  # noqa: E402


def load_web(web: Path) -> list[str]:
    docs = []
    for f in sorted(web.iterdir()):
        if f.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if f.name.endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8") as fh:
                docs += [json.loads(l)["text"] for l in fh if l.strip()]
        elif f.name.endswith(".txt"):
            docs += [l.strip() for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
    return docs


def write_input(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d}) + "\n")


def run_phiforge(inp: Path, work: Path) -> float:
    from phiforge.data import dedup, filters

    t0 = time.perf_counter()
    filters.main([str(inp), "--out", str(work / "filter")])
    dedup.main([str(work / "filter"), "--out", str(work / "dedup")])
    return time.perf_counter() - t0


def _patch_xxhash() -> None:
    """datatrove 0.10 passes str to xxhash, which xxhash >= 4 rejects; encode first (its default, fastest hash)."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    dt_xxhash.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    dt_xxhash.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode("utf-8") if isinstance(d, str) else d)


def run_datatrove(inp: Path, work: Path) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, \
        MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()
    _patch_xxhash()
    common = dict(tasks=1, workers=1, start_method="fork")
    t0 = time.perf_counter()
    steps = [
        LocalPipelineExecutor([JsonlReader(str(inp.parent), glob_pattern=inp.name), GopherRepetitionFilter(),
                               GopherQualityFilter(), C4QualityFilter(), JsonlWriter(str(work / "filter"))],
                              logging_dir=str(work / "logs0"), **common),
        LocalPipelineExecutor([JsonlReader(str(work / "filter")), MinhashDedupSignature(str(work / "sigs"), cfg)],
                              logging_dir=str(work / "logs1"), **common),
        LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)],
                              logging_dir=str(work / "logs2"), tasks=cfg.num_buckets, workers=1, start_method="fork"),
        LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)],
                              logging_dir=str(work / "logs3"), **common),
        LocalPipelineExecutor([JsonlReader(str(work / "filter")), MinhashDedupFilter(str(work / "remove")),
                               JsonlWriter(str(work / "dedup"))], logging_dir=str(work / "logs4"), **common),
    ]
    for s in steps:
        s.run()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    shared = shared_dir()
    if shared is None or not (shared / "data" / "web").is_dir():
        print("bench_data: ../shared/data/web not found; cannot benchmark", file=sys.stderr)
        return 1
    logging.disable(logging.WARNING)
    from loguru import logger  # datatrove logs every step; keep the output to our lines

    logger.remove()
    docs = load_web(shared / "data" / "web") * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_input(tmp / "warm" / "in.jsonl.gz", docs[:20])
        write_input(tmp / "in" / "in.jsonl.gz", docs)
        run_phiforge(tmp / "warm" / "in.jsonl.gz", tmp / "pf_warm")
        run_datatrove(tmp / "warm" / "in.jsonl.gz", tmp / "dt_warm")
        t_dt = run_datatrove(tmp / "in" / "in.jsonl.gz", tmp / "dt")
        t_pf = run_phiforge(tmp / "in" / "in.jsonl.gz", tmp / "pf")
        kept_pf = json.loads((tmp / "pf" / "dedup" / "stats.json").read_text())["docs_out"]
        kept_dt = sum(1 for f in (tmp / "dt" / "dedup").glob("*.jsonl*")
                      for _ in gzip.open(f, "rt"))
    n = len(docs)
    print(f"documents: {n}")
    print(f"phiforge : {n / t_pf:8.1f} docs/s ({t_pf:.2f} s, kept {kept_pf})")
    print(f"datatrove: {n / t_dt:8.1f} docs/s ({t_dt:.2f} s, kept {kept_dt})")
    print(f"bench_data: {t_dt / t_pf:.2f}x vs datatrove (goal >= 1.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
