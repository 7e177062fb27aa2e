"""Text, jsonl(.gz) and parquet in -> packed token shards out (see shards.py for the format).

    phiforge tokenize --tokenizer runs/tok --out runs/tok_ts \\
        ../shared/data/tinystories/TinyStories-train_first2MiB.txt.gz
    phiforge tokenize --tokenizer runs/tok --out runs/tok_c4 --text-key text ../shared/data/web/*.jsonl.gz

Documents are read in input order and grouped into chunks of --docs-per-shard; chunk k becomes train_<k>.bin and
val_<k>.bin. Each document goes to validation iff a hash of (seed, text) falls below --val-fraction, so the split
is deterministic and does not depend on chunking or worker count; --holdout-last N instead sends exactly the last N
documents of the inputs to validation (a fixed held-out tail, e.g. the TinyStories rule in recipes/tinystories.yaml).
Each document is followed by the EOS token.
Chunks are encoded by --workers processes. A rerun skips chunks whose shards already exist, so a killed run redoes
only the unfinished ones; meta.json (with complete: true) is written last.

Text files: --text-sep eot (default: documents separated by "<|endoftext|>"), line, blank (blank lines), nul, file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import deque
from pathlib import Path

from phiforge.data.io import input_files, read_documents
from phiforge.train.shards import read_header, shard_paths, write_shard
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, check_writable

SEPARATORS = ("eot", "line", "blank", "nul", "file")


def is_validation(text: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < val_fraction


# -- worker ---------------------------------------------------------------------------------------------------------
_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    from phiforge.tokenizer import Tokenizer
    _TOKENIZER = Tokenizer.from_folder(tokenizer_dir)


def encode_chunk(k: int, docs: list[str], out: str, seed: int, val_fraction: float,
                 held_from: int | None = None) -> tuple[int, int, int]:
    """Encode one chunk of documents into train_<k>.bin and val_<k>.bin. Returns (k, docs, tokens).
    `held_from`: documents from this index of the chunk on are validation (--holdout-last); None: the hash split."""
    tok = _TOKENIZER
    eos, vocab = tok.eos_id, tok.vocab_size
    parts: dict[str, list[int]] = {"train": [], "val": []}
    ndocs = {"train": 0, "val": 0}
    for i, text in enumerate(docs):
        if held_from is None:
            split = "val" if is_validation(text, seed, val_fraction) else "train"
        else:
            split = "val" if i >= held_from else "train"
        parts[split] += tok.encode(text)
        parts[split].append(eos)
        ndocs[split] += 1
    # val first: a chunk counts as done when its train shard exists
    for split in ("val", "train"):
        write_shard(Path(out) / f"{split}_{k:05d}.bin", parts[split], vocab, eos, ndocs[split])
    return k, len(docs), len(parts["train"]) + len(parts["val"])


def _chunk_done(out: Path, k: int) -> bool:
    try:
        read_header(out / f"train_{k:05d}.bin")
        read_header(out / f"val_{k:05d}.bin")
        return True
    except UserError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge tokenize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="text (.txt/.txt.gz), jsonl (.jsonl/.jsonl.gz) or .parquet files or "
                    "directories")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (phiforge or HF: tokenizer.json)")
    ap.add_argument("--out", required=True, help="output token directory")
    ap.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    ap.add_argument("--text-sep", default="eot", choices=SEPARATORS, help="how a text file separates documents")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    ap.add_argument("--holdout-last", type=int, default=None, metavar="N",
                    help="validation = exactly the last N documents of the inputs (replaces the --val-fraction split)")
    ap.add_argument("--docs-per-shard", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2, help="encoding processes (default 2: both cores)")
    ap.add_argument("--seed", type=int, default=0, help="salt of the train/validation hash split")
    args = ap.parse_args(argv)

    # -- check everything before any work
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.docs_per_shard < 1 or args.workers < 1:
        raise UserError("--docs-per-shard and --workers must be >= 1")
    if args.holdout_last is not None and args.holdout_last < 1:
        raise UserError(f"--holdout-last must be >= 1, got {args.holdout_last}")
    check_writable(args.out, "dir")
    files = input_files(args.inputs)
    first_held = None  # global index of the first held-out document (--holdout-last)
    if args.holdout_last is not None:
        n_docs = sum(1 for f in files for _ in read_documents(f, args.text_key, args.text_sep))
        if args.holdout_last >= n_docs:
            raise UserError(f"--holdout-last {args.holdout_last} leaves no training documents: the inputs hold "
                            f"{n_docs}")
        first_held = n_docs - args.holdout_last
    from phiforge.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(args.tokenizer)
    if tok.eos_id is None:
        raise UserError(f"tokenizer {args.tokenizer} has no EOS token to separate documents")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_fingerprint = hashlib.sha256(tok.backend.to_str().encode() if tok.backend is not None
                                     else Path(args.tokenizer, "tokenizer.model").read_bytes()).hexdigest()[:16]
    settings = {"inputs": [str(f.resolve()) for f in files], "sizes": [f.stat().st_size for f in files],
                "text_key": args.text_key, "text_sep": args.text_sep, "val_fraction": args.val_fraction,
                "holdout_last": args.holdout_last, "docs_per_shard": args.docs_per_shard, "seed": args.seed,
                "tokenizer": tok_fingerprint}
    progress_file = out / "tokenize.json"
    if progress_file.exists():
        previous = json.loads(progress_file.read_text())
        if previous != settings:
            raise UserError(f"{out} holds shards made with other inputs or settings; delete it or choose another "
                            "--out")
    elif shard_paths(out, "train") or (out / "meta.json").exists():
        raise UserError(f"{out} already holds token shards from an unknown run; delete it or choose another --out")
    atomic_write_json(progress_file, settings)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # rewritten (complete) at the end
    tok.save(out / "tokenizer")

    # -- encode chunks in a pool, a bounded number in flight
    from tqdm import tqdm

    def chunks():
        docs: list[str] = []
        k = 0
        for f in files:
            for d in read_documents(f, args.text_key, args.text_sep):
                docs.append(d)
                if len(docs) == args.docs_per_shard:
                    yield k, docs
                    docs, k = [], k + 1
        if docs or k == 0:
            yield k, docs

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel over processes, not inside each
    bar = tqdm(desc="tokenize", unit="doc", file=sys.stderr, dynamic_ncols=True)
    skipped = encoded = total_chunks = 0
    if args.workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer,))
    else:
        pool = None
        _init_worker(args.tokenizer)
    pending: deque = deque()
    try:
        for k, docs in chunks():
            total_chunks += 1
            if _chunk_done(out, k):
                skipped += 1
                bar.update(len(docs))
                continue
            held_from = None if first_held is None else max(0, first_held - k * args.docs_per_shard)
            job = (k, docs, str(out), args.seed, args.val_fraction, held_from)
            if pool is None:
                bar.update(encode_chunk(*job)[1])
                encoded += 1
                continue
            pending.append(pool.apply_async(encode_chunk, job))
            while len(pending) >= 2 * args.workers:
                bar.update(pending.popleft().get()[1])
                encoded += 1
        while pending:
            bar.update(pending.popleft().get()[1])
            encoded += 1
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()

    # -- shards beyond the last chunk would be stale leftovers of a different run: refuse rather than mix them in
    for split in ("train", "val"):
        for p in shard_paths(out, split):
            if int(p.stem.split("_")[1]) >= total_chunks:
                raise UserError(f"{p} does not belong to this run; delete {out} and tokenize again")
    stats = {}
    for split in ("train", "val"):
        headers = [read_header(p) for p in shard_paths(out, split)]
        stats[split] = {"shards": len(headers), "tokens": sum(h.num_tokens for h in headers),
                        "docs": sum(h.num_docs for h in headers)}
    meta = {"format": "phiforge-token-shards", "version": 1, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32", "tokenizer": "tokenizer",
            "settings": settings, **stats, "complete": True}
    atomic_write_json(meta_path, meta)
    print(f"tokenize: {stats['train']['tokens']:,} train tokens ({stats['train']['docs']:,} docs), "
          f"{stats['val']['tokens']:,} val tokens ({stats['val']['docs']:,} docs) in {total_chunks} chunk(s) "
          f"({encoded} encoded, {skipped} already done) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main
    sys.exit(run_main(main, sys.argv[1:]))
