"""`phiforge tokenize` and the shard format: round trip, EOS separation, deterministic split, both input formats,
2 worker processes, resume after a kill, and corrupt / truncated shards refused with a clear message."""
from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest

from phiforge.train import tokenize as tk
from phiforge.train.shards import HEADER_BYTES, open_shard, read_header, read_meta, shard_paths, write_shard
from phiforge.utils import UserError

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Zoe"]
THINGS = ["a red ball", "a big dog", "a small boat", "a blue kite", "a funny hat"]


def make_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Once upon a time, {rng.choice(NAMES)} found {rng.choice(THINGS)}. {rng.choice(NAMES)} said "
            f"\"hello\" {i} times and they were happy." for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from phiforge.tokenizer import train_bpe
    d = tmp_path_factory.mktemp("tok")
    train_bpe(make_stories(200, seed=1), vocab_size=300).save(d)
    return d


def read_split_docs(out, split, tok):
    """Decode every document of a split (documents end with EOS)."""
    docs = []
    for p in shard_paths(out, split):
        header, tokens = open_shard(p)
        assert header.eos_id == tok.eos_id and header.vocab_size == tok.vocab_size
        ids = tokens.tolist()
        assert not ids or ids[-1] == tok.eos_id
        cur = []
        for t in ids:
            if t == tok.eos_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        assert header.num_docs == sum(1 for t in ids if t == tok.eos_id)
    return docs


def test_tokenize_roundtrip_split_and_formats(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from phiforge.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tok_dir)
    stories = make_stories(300)
    txt = tmp_path / "a.txt.gz"
    with gzip.open(txt, "wt") as f:
        f.write("\n<|endoftext|>\n".join(stories[:100]))
    jl = tmp_path / "b.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        f.write("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(stories[100:200])))
    pq.write_table(pa.table({"text": stories[200:]}), tmp_path / "c.parquet")
    inputs = [str(txt), str(jl), str(tmp_path / "c.parquet")]

    out2 = tmp_path / "out2"
    assert tk.main([*inputs, "--tokenizer", str(tok_dir), "--out", str(out2), "--docs-per-shard", "37",
                    "--val-fraction", "0.2", "--workers", "2"]) == 0
    meta = read_meta(out2)
    assert meta["complete"] and meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    train, val = read_split_docs(out2, "train", tok), read_split_docs(out2, "val", tok)
    assert sorted(train + val) == sorted(stories)  # every document exactly once, text round-trips
    assert 20 <= len(val) <= 100  # ~20% held out
    assert len(shard_paths(out2, "train")) == 9  # ceil(300 / 37) chunks

    # the split depends on the text only: one worker and another chunking give the same validation set
    out1 = tmp_path / "out1"
    tk.main([*inputs, "--tokenizer", str(tok_dir), "--out", str(out1), "--docs-per-shard", "1000",
             "--val-fraction", "0.2", "--workers", "1"])
    assert sorted(read_split_docs(out1, "val", tok)) == sorted(val)
    assert read_meta(out1)["train"]["tokens"] == meta["train"]["tokens"]


def test_holdout_last_sends_exactly_the_tail_to_validation(tmp_path, tok_dir):
    """--holdout-last N: the last N documents of all inputs (in order, across shards) and nothing else are val."""
    from phiforge.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tok_dir)
    stories = make_stories(120, seed=4)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("<|endoftext|>".join(stories[:70]))
    b.write_text("<|endoftext|>".join(stories[70:]))
    out = tmp_path / "out"
    tk.main([str(a), str(b), "--tokenizer", str(tok_dir), "--out", str(out), "--holdout-last", "23",
             "--docs-per-shard", "40", "--workers", "1"])
    assert read_split_docs(out, "val", tok) == stories[-23:]
    assert read_split_docs(out, "train", tok) == stories[:-23]
    with pytest.raises(UserError, match="leaves no training documents"):
        tk.main([str(a), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o2"), "--holdout-last", "70"])


def test_tokenize_resume_redoes_only_unfinished(tmp_path, tok_dir):
    src = tmp_path / "s.txt"
    src.write_text("<|endoftext|>".join(make_stories(120)))
    out = tmp_path / "out"
    argv = [str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--docs-per-shard", "30", "--workers", "2"]
    tk.main(argv)
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    # simulate a run killed after chunk 1: chunks 2 and 3 missing, meta.json not yet written
    for k in (2, 3):
        (out / f"train_{k:05d}.bin").unlink()
    (out / "meta.json").unlink()
    with pytest.raises(UserError, match="did not finish"):
        read_meta(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    tk.main(argv)
    after = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert after == before  # identical output
    assert (out / "train_00000.bin").stat().st_mtime_ns == mtimes["train_00000.bin"]  # finished chunk skipped
    assert (out / "val_00002.bin").stat().st_mtime_ns != mtimes["val_00002.bin"]  # unfinished chunk redone
    with pytest.raises(UserError, match="other inputs or settings"):
        tk.main(argv[:-2] + ["--workers", "1", "--val-fraction", "0.5"])


def test_shard_header_and_damage(tmp_path):
    p = tmp_path / "x.bin"
    tokens = np.arange(1000) % 70000
    write_shard(p, tokens, vocab_size=70000, eos_id=5, num_docs=3)
    h, arr = open_shard(p)
    assert (h.itemsize, h.vocab_size, h.num_tokens, h.num_docs, h.eos_id) == (4, 70000, 1000, 3, 5)  # uint32
    assert np.array_equal(arr, tokens)
    write_shard(p, [1, 2, 3], vocab_size=300, eos_id=0, num_docs=1)
    assert read_header(p).itemsize == 2 and os.path.getsize(p) == HEADER_BYTES + 6

    raw = p.read_bytes()
    p.write_bytes(raw[:-1])
    with pytest.raises(UserError, match="truncated"):
        open_shard(p)
    p.write_bytes(raw[:10])
    with pytest.raises(UserError, match="truncated"):
        open_shard(p)
    p.write_bytes(raw[:-2] + bytes([raw[-2] ^ 1, raw[-1]]))
    with pytest.raises(UserError, match="checksum"):
        open_shard(p)
    p.write_bytes(b"GARBAGE!" + raw[8:])
    with pytest.raises(UserError, match="not a phiforge token shard"):
        open_shard(p)
    with pytest.raises(UserError, match="does not exist"):
        open_shard(tmp_path / "missing.bin")
