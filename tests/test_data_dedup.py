"""Exact + MinHash LSH dedup (acceptance: planted near-duplicates) and 13-gram decontamination."""
from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest

from phiforge.data import decontam, dedup
from phiforge.data.dedup import MinHashConfig, MinHasher, cluster, normalize_words, signatures, word_hashes
from phiforge.data.io import read_jsonl
from phiforge.utils import UserError, shared_dir

os.environ["PHIFORGE_NO_PROGRESS"] = "1"


def base_corpus(n: int) -> tuple[list[str], str]:
    """Real text (TinyStories + C4 + Wikipedia chunks) when ../shared is there, else Zipfian synthetic text."""
    shared = shared_dir()
    docs: list[str] = []
    if shared is not None and (shared / "data" / "tinystories").is_dir():
        d = shared / "data"
        for name, sep in [("TinyStories-train_first2MiB.txt.gz", "<|endoftext|>"),
                          ("tinystories_10klines_chunk.txt.gz", "<|endoftext|>"),
                          ("tinystories_alldata_data00_head_512KB.txt.gz", "\x00")]:
            docs += gzip.open(d / "tinystories" / name, "rt").read().split(sep)
        long = [json.loads(l)["text"] for l in gzip.open(d / "web" / "c4_en_train_first1000.jsonl.gz", "rt")]
        long += [json.loads(l)["text"] for l in open(d / "web" / "c4_demo_llamafactory.jsonl")]
        long += open(d / "web" / "wiki_demo_llamafactory.txt").read().splitlines()
        long += [l for l in open(d / "wikitext" / "wikitext-2-raw-test.txt", encoding="utf-8")]
        for text in long:  # web pages in 150-word pieces: more, and more varied, documents
            w = text.split()
            docs += [" ".join(w[i:i + 150]) for i in range(0, len(w), 150)]
        source = "shared"
    else:
        rng = np.random.default_rng(0)
        vocab = [f"w{i}" for i in range(20000)]
        p = 1 / np.arange(1, 20001) ** 1.1
        docs = [" ".join(rng.choice(vocab, size=int(rng.integers(60, 300)), p=p / p.sum())) for _ in range(n)]
        source = "synthetic"
    return [d.strip() for d in docs if len(d.split()) >= 30], source


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """Edit `rate` of the words: 60% substitutions, 20% deletions, 20% insertions."""
    w = text.split()
    for i in rng.sample(range(len(w)), max(1, round(rate * len(w)))):
        op = rng.random()
        w[i] = rng.choice(vocab) if op < 0.6 else "" if op < 0.8 else w[i] + " " + rng.choice(vocab)
    return " ".join(x for x in w if x)


def test_planted_near_duplicates_recall_and_precision():
    """Acceptance: near-duplicates (5-10% of words edited) in a 10k-document set: recall >= 0.95, precision >= 0.99."""
    total, n_plant = 10_000, 1_000
    docs, source = base_corpus(total)
    hasher = MinHasher(MinHashConfig())
    # The ground truth must be clean: drop near-duplicates already inside the base corpus first.
    e, s = signatures(docs, hasher)
    roots, _ = cluster(e, s, hasher)
    base = [d for d, r, i in zip(docs, roots, range(len(docs))) if r == i][:total - n_plant]
    rng = random.Random(0)
    vocab = [w for d in base[:300] for w in d.split()]
    src = rng.sample(range(len(base)), n_plant)
    planted = [edit(base[i], rng.uniform(0.05, 0.10), rng, vocab) for i in src]
    order = list(range(len(base) + n_plant))
    rng.shuffle(order)  # copies may come before their originals
    texts_all = base + planted
    texts = [texts_all[i] for i in order]
    pos = {orig: k for k, orig in enumerate(order)}
    assert len(texts) == total
    e, s = signatures(texts, hasher)
    roots, counts = cluster(e, s, hasher)
    keep = roots == np.arange(total)  # what dedup_texts returns: the earliest document of each cluster
    found = sum(roots[pos[len(base) + j]] == roots[pos[i]] for j, i in enumerate(src))
    recall = found / n_plant
    removed = set(np.flatnonzero(~keep).tolist())
    in_planted_pair = {pos[len(base) + j] for j in range(n_plant)} | {pos[i] for i in src}
    precision = len(removed & in_planted_pair) / max(len(removed), 1)
    print(f"near-dup ({source} base): recall {recall:.4f} precision {precision:.4f} removed {len(removed)} {counts}")
    assert recall >= 0.95 and precision >= 0.99


def test_signatures_batch_equals_single_and_normalization():
    hasher = MinHasher(MinHashConfig())
    texts = ["Hello, World!", "", "a b", "The quick brown fox jumps over the lazy dog " * 5, "café NAÏVE déjà-vu"]
    e, s = signatures(texts, hasher)
    for i, t in enumerate(texts):
        assert (s[i] == hasher.signature(word_hashes(t))).all()
    assert normalize_words("Hello, World! it's_x") == ["hello", "world", "it", "s", "x"]
    assert len(word_hashes("Hello, World! it's_x")) == 5
    e2, _ = signatures(["hello world", "HELLO   world!!"], hasher)
    assert e2[0] == e2[1] == e[0]  # exact dedup ignores case, punctuation and spacing
    story = "Tom and Lily went to the park to fly a red kite on a windy day and they laughed a lot together."
    keep = dedup.dedup_texts([story, "A different text about bees, flowers, pollen and honey in the summer time.",
                              story.replace("red", "blue"), story.upper()])
    assert keep.tolist() == [True, True, False, False]


def test_dedup_stage_in_phases_across_ranks(tmp_path):
    a = "Tom and Lily went to the park to fly a red kite on a windy day in the spring and they laughed a lot."
    b = "A fraction names part of a whole; the denominator counts the equal parts and the numerator counts ours."
    c = "Bees carry pollen between flowers, which lets plants make seeds, and they turn nectar into honey."
    docs = [a, b, a.upper(), c, b.replace("whole", "hole"), "bad"]
    lines = [json.dumps({"text": t, "id": f"d{i}"}) for i, t in enumerate(docs)]
    lines[5] = "{broken"
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    common = [str(inp), "--out", str(out), "--shard-size", "2", "--threshold", "0.4"]
    for r in range(2):
        dedup.main(common + ["--phase", "signatures", "--rank", str(r), "--world", "2"])
    dedup.main(common + ["--phase", "cluster"])
    for r in range(2):
        dedup.main(common + ["--phase", "write", "--rank", str(r), "--world", "2"])
    ids = [d["id"] for f in sorted(out.glob("*.jsonl.gz")) for d in read_jsonl(f)]
    assert ids == ["d0", "d1", "d3"]
    st = json.loads((out / "stats.json").read_text())
    assert st["removed"] == {"duplicate": 2} and st["malformed"] == 1
    assert json.loads((out / "clusters.json").read_text())["exact_pairs"] == 1


def test_decontam_drops_or_reports_13gram_overlap(tmp_path):
    ev = tmp_path / "eval.jsonl"
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    ev.write_text(json.dumps({"question": q, "answer": "72"}) + "\n")
    clean = "Tom and Lily went to the park to fly a red kite on a windy day in the spring and laughed."
    leaked = "Here is a homework problem. " + q.lower() + " How many clips did she sell?"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate([clean, leaked, "72"])))
    decontam.main([str(inp), "--out", str(tmp_path / "o"), "--eval-sets", str(ev)])
    assert [d["id"] for d in read_jsonl(tmp_path / "o" / "00000.jsonl.gz")] == ["0", "2"]
    st = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert st["removed"] == {"eval_overlap": 1} and st["extra"]["contaminated_by.eval.jsonl"] == 1
    decontam.main([str(inp), "--out", str(tmp_path / "r"), "--eval-sets", str(ev), "--report-only"])
    assert len(list(read_jsonl(tmp_path / "r" / "00000.jsonl.gz"))) == 3
    with pytest.raises(UserError, match="no such file"):
        decontam.main([str(inp), "--out", str(tmp_path / "x"), "--eval-sets", str(tmp_path / "nope.jsonl")])
