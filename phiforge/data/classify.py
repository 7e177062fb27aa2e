"""Quality classifier: train on LLM (or human) labels, score every document, keep those above a threshold.

    phiforge data train-classifier runs/data/labels --out runs/data/clf          # labels from `data annotate`
    phiforge data train-classifier ../shared/data/quality_labels --out runs/clf --eval
    phiforge data score runs/data/dedup --model runs/data/clf --out runs/data/scored --threshold 0.5

The report's LLM-based filtering (Phi-3 report section 2; FineWeb-Edu, Penedo et al. 2024) annotates a sample with
a strong model and distils it into a fast classifier. Ours is logistic regression in numpy over
  * hashed word unigrams + bigrams (2^18 buckets, log counts, L2-normalised), and
  * 14 dense text statistics (length, word length, stop words, punctuation, repetition, ...),
trained full-batch with Adam on class-balanced logistic loss + L2. Which feature set (n-grams, statistics or both),
the L2 strength and the decision threshold are chosen by 4-fold cross-validated F1 on the training split only;
the held-out split is touched once, for the final numbers. With a few hundred labels the statistics carry most of
the signal and the n-grams add topic cues; cross-validation decides rather than us.

Label files: our annotations (jsonl(.gz) {text, score 0-5}), DCLM-style jsonl {text, label 0/1}, FineWeb-Edu-style
CSV {text, score}. A document is positive when label == 1 or score >= --min-score (default 3, FineWeb-Edu's cut).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.data.dedup import word_hashes
from phiforge.data.io import expand_files, read_jsonl
from phiforge.data.filters import STOP_WORDS, FilterConfig, all_rule_results, filter_doc
from phiforge.utils import ArgumentParser, UserError, atomic_write_json, check_writable, normal_mode

N_BUCKETS = 1 << 18
MAX_FEATURE_CHARS = 20_000  # n-grams of the first 20k characters: the rest adds cost, not signal
DENSE = ["log_words", "avg_word_len", "stop_word_frac", "alpha_word_frac", "upper_frac", "digit_frac",
         "punct_end_lines", "short_lines", "dup_line_frac", "bullet_lines", "symbol_ratio", "log_lines",
         "unique_word_frac", "mean_sentence_len"]


# ---------------------------------------------------------------- labels

def load_labels(paths: list[str], min_score: float = 3.0) -> list[tuple[str, int, float]]:
    """(text, y, raw score) from every label file under paths; y = 1 means keep."""
    files = expand_files(paths, (".jsonl", ".jsonl.gz", ".csv"), what="label", recursive=False, check_suffix=False)
    out = []
    for f in files:
        rows: list[dict]
        if f.name.endswith(".csv"):
            csv.field_size_limit(1 << 30)
            with open(f, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            rows = list(read_jsonl(f))
        for r in rows:
            text = r.get("text")
            if not isinstance(text, str) or not text.strip():
                continue
            if r.get("label") not in (None, ""):
                y = int(float(r["label"]))
                out.append((text, y, float(y)))
            elif r.get("score") not in (None, ""):
                s = float(r["score"])
                out.append((text, int(s >= min_score), s))
    if not out:
        raise UserError(f"no labelled documents in {paths}: expected {{text, label}} or {{text, score}} rows")
    return out


def is_heldout(text: str, fraction: float = 0.3, seed: int = 0) -> bool:
    """Deterministic split by a hash of the text: independent of file order and of the other documents."""
    h = hashlib.blake2b(f"{seed}:{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


# ---------------------------------------------------------------- features

def dense_stats(text: str) -> np.ndarray:
    words = text.split()
    n = max(len(words), 1)
    lines = [l for l in text.splitlines() if l.strip()] or [""]
    chars = max(len(text), 1)
    sentences = max(len(re.findall(r"[.!?](?:\s|$)", text)), 1)
    return np.array([
        np.log1p(len(words)),
        sum(map(len, words)) / n,
        sum(1 for w in words if w.lower() in STOP_WORDS) / n,
        sum(1 for w in words if any(c.isalpha() for c in w)) / n,
        sum(1 for c in text if c.isupper()) / chars,
        sum(1 for c in text if c.isdigit()) / chars,
        sum(1 for l in lines if l.rstrip().endswith((".", "!", "?", '"'))) / len(lines),
        sum(1 for l in lines if len(l.split()) < 4) / len(lines),
        1 - len(set(lines)) / len(lines),
        sum(1 for l in lines if l.lstrip().startswith(("•", "-", "*", "·"))) / len(lines),
        sum(1 for c in text if not c.isalnum() and not c.isspace()) / chars,
        np.log1p(len(lines)),
        len(set(w.lower() for w in words)) / n,
        np.log1p(len(words) / sentences),
    ], dtype=np.float64)


def ngram_features(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values): hashed unigrams and bigrams, log1p counts, L2-normalised."""
    h = word_hashes(text[:MAX_FEATURE_CHARS])
    with np.errstate(over="ignore"):
        grams = np.r_[h, h[:-1] * np.uint64(0x9E3779B97F4A7C15) + h[1:]] if len(h) else h
    idx, cnt = np.unique((grams % np.uint64(N_BUCKETS)).astype(np.int64), return_counts=True)
    val = np.log1p(cnt.astype(np.float64))
    return idx, val / max(np.linalg.norm(val), 1e-12)


@dataclass
class Features:
    """A CSR matrix of n-gram features plus a dense block."""
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    dense: np.ndarray

    @classmethod
    def build(cls, texts: list[str]) -> "Features":
        parts = [ngram_features(t) for t in texts]
        indptr = np.r_[0, np.cumsum([len(i) for i, _ in parts])]
        indices = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
        data = np.concatenate([v for _, v in parts]) if parts else np.zeros(0)
        dense = np.stack([dense_stats(t) for t in texts]) if texts else np.zeros((0, len(DENSE)))
        return cls(indptr, indices, data, dense)

    def take(self, rows: np.ndarray) -> "Features":
        idx = [np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows]
        flat = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        indptr = np.r_[0, np.cumsum([len(i) for i in idx])]
        return Features(indptr, self.indices[flat], self.data[flat], self.dense[rows])

    def __len__(self) -> int:
        return len(self.dense)


@dataclass
class Model:
    w_sparse: np.ndarray  # [N_BUCKETS]
    w_dense: np.ndarray  # [len(DENSE)]
    bias: float
    mean: np.ndarray
    std: np.ndarray
    use_ngrams: bool
    use_dense: bool
    threshold: float

    def logits(self, X: Features) -> np.ndarray:
        z = np.full(len(X), self.bias)
        if self.use_ngrams and len(X.data):
            contrib = self.w_sparse[X.indices] * X.data
            z += np.add.reduceat(np.r_[contrib, 0.0], X.indptr[:-1])[:len(X)] * (np.diff(X.indptr) > 0)
        if self.use_dense:
            z += ((X.dense - self.mean) / self.std) @ self.w_dense
        return z

    def predict_proba(self, X: Features) -> np.ndarray:
        return 1 / (1 + np.exp(-self.logits(X)))


def fit(X: Features, y: np.ndarray, l2: float, use_ngrams: bool, use_dense: bool, steps: int = 150,
        lr: float = 0.1) -> Model:
    """Class-balanced logistic regression, full-batch Adam (150 steps converge on a few hundred labels).

    Only the buckets that occur in X are trained (the rest stay 0 and would get no gradient anyway), which makes
    a step cost O(nnz) instead of O(2^18).
    """
    mean, std = X.dense.mean(0), X.dense.std(0) + 1e-6
    cols, local = np.unique(X.indices, return_inverse=True)
    pos = max(y.mean(), 1e-6)
    sw = np.where(y == 1, 0.5 / pos, 0.5 / max(1 - pos, 1e-6)) / len(y)  # each class weighs half
    row = np.repeat(np.arange(len(X)), np.diff(X.indptr))
    Z = (X.dense - mean) / std
    params = [np.zeros(len(cols) if use_ngrams else 0), np.zeros(len(DENSE) if use_dense else 0), np.zeros(1)]
    mom = [np.zeros_like(p) for p in params]
    vel = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        ws, wd, b = params
        z = np.full(len(X), b[0])
        if use_ngrams:
            z += np.bincount(row, weights=ws[local] * X.data, minlength=len(X))
        if use_dense:
            z += Z @ wd
        g = (1 / (1 + np.exp(-z)) - y) * sw  # dLoss/dlogit
        grads = [np.bincount(local, weights=X.data * g[row], minlength=len(cols)) + l2 * ws if use_ngrams else ws,
                 Z.T @ g + l2 * wd if use_dense else wd, np.array([g.sum()])]
        for p, gr, mo, ve in zip(params, grads, mom, vel):
            mo *= 0.9
            mo += 0.1 * gr
            ve *= 0.999
            ve += 0.001 * gr * gr
            p -= lr * (mo / (1 - 0.9**t)) / (np.sqrt(ve / (1 - 0.999**t)) + 1e-8)
    w_sparse = np.zeros(N_BUCKETS)
    if use_ngrams:
        w_sparse[cols] = params[0]
    return Model(w_sparse, params[1] if use_dense else np.zeros(len(DENSE)), float(params[2][0]), mean, std,
                 use_ngrams, use_dense, 0.5)


def prf(y: np.ndarray, pred: np.ndarray) -> dict:
    tp = int(((pred == 1) & (y == 1)).sum())
    p = tp / max(int(pred.sum()), 1)
    r = tp / max(int(y.sum()), 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4),
            "n": int(len(y))}


def best_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    cands = np.unique(np.r_[prob, 0.5])
    f1s = [prf(y, (prob >= c).astype(int))["f1"] for c in cands]
    return float(cands[int(np.argmax(f1s))])


CANDIDATES = [(ng, de, l2) for ng, de in ((True, False), (False, True), (True, True)) for l2 in (1e-3, 1e-2)]


def select_and_fit(X: Features, y: np.ndarray, folds: int = 4, seed: int = 0) -> tuple[Model, list[dict]]:
    """Pick feature set + L2 by k-fold cross-validated F1 (training data only), refit on all of it."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % folds
    table = []
    for ng, de, l2 in CANDIDATES:
        oof = np.zeros(len(y))
        for k in range(folds):
            tr, va = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            oof[va] = fit(X.take(tr), y[tr], l2, ng, de).predict_proba(X.take(va))
        thr = best_threshold(y, oof)
        table.append({"ngrams": ng, "dense": de, "l2": l2, "cv_threshold": thr,
                      **{f"cv_{k}": v for k, v in prf(y, (oof >= thr).astype(int)).items()}})
    best = max(table, key=lambda r: r["cv_f1"])
    model = fit(X, y, best["l2"], best["ngrams"], best["dense"])
    model.threshold = best["cv_threshold"]
    return model, table


def heuristic_predictions(texts: list[str]) -> dict[str, np.ndarray]:
    """Each heuristic on its own as a keep/drop predictor (1 = passes), plus the whole filter stage."""
    cfg = FilterConfig()
    rules = [all_rule_results(t, cfg) for t in texts]
    out = {name: np.array([int(r[name]) for r in rules]) for name in rules[0]}
    out["filter_stage_all_rules"] = np.array([int(filter_doc(t, cfg)[0] is None) for t in texts])
    return out


def evaluate(label_paths: list[str], heldout: float = 0.3, min_score: float = 3.0) -> dict:
    """Train on the non-held-out labels, report classifier vs every single heuristic on the held-out ones."""
    rows = load_labels(label_paths, min_score)
    test = np.array([is_heldout(t, heldout) for t, _, _ in rows])
    texts = [t for t, _, _ in rows]
    y = np.array([yy for _, yy, _ in rows])
    X = Features.build(texts)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    model, table = select_and_fit(X.take(tr), y[tr])
    prob = model.predict_proba(X.take(te))
    heur = {k: prf(y[te], v) for k, v in heuristic_predictions([texts[i] for i in te]).items()}
    best = max(heur, key=lambda k: heur[k]["f1"])
    return {"train": int(len(tr)), "heldout": int(len(te)), "heldout_positive_rate": round(float(y[te].mean()), 4),
            "classifier": {**prf(y[te], (prob >= model.threshold).astype(int)), "threshold": model.threshold,
                           "features": ("ngrams+" if model.use_ngrams else "") + ("stats" if model.use_dense else "")},
            "heuristics": heur, "best_heuristic": best, "cv_selection": table}, model


# ---------------------------------------------------------------- save / load

def save_model(model: Model, folder: Path, info: dict) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file({"w_sparse": model.w_sparse.astype(np.float32), "w_dense": model.w_dense,
               "mean": model.mean, "std": model.std}, str(tmp))
    normal_mode(tmp)
    tmp.replace(folder / "model.safetensors")
    atomic_write_json(folder / "config.json", {"bias": model.bias, "use_ngrams": model.use_ngrams,
                                               "use_dense": model.use_dense, "threshold": model.threshold,
                                               "n_buckets": N_BUCKETS, "dense": DENSE, **info})


def load_model(folder: str | Path) -> Model:
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise UserError(f"{folder}: no classifier here; train one with `phiforge data train-classifier`")
    t = load_file(str(folder / "model.safetensors"))
    c = json.loads((folder / "config.json").read_text())
    return Model(t["w_sparse"].astype(np.float64), t["w_dense"], c["bias"], t["mean"], t["std"], c["use_ngrams"],
                 c["use_dense"], c["threshold"])


# ---------------------------------------------------------------- stages

def train_main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge data train-classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("labels", nargs="+", help="label files or folders (jsonl(.gz) / csv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-score", type=float, default=3.0)
    ap.add_argument("--eval", action="store_true", help="hold out 30%% (by text hash) and compare to heuristics")
    args = ap.parse_args(argv)
    check_writable(args.out, "dir")
    if args.eval:
        result, model = evaluate(args.labels, min_score=args.min_score)
        atomic_write_json(Path(args.out) / "eval.json", result)
        c, b = result["classifier"], result["heuristics"][result["best_heuristic"]]
        print(f"classifier  P={c['precision']:.3f} R={c['recall']:.3f} F1={c['f1']:.3f} ({c['features']})")
        print(f"best single heuristic ({result['best_heuristic']})  P={b['precision']:.3f} R={b['recall']:.3f} "
              f"F1={b['f1']:.3f}")
    else:
        rows = load_labels(args.labels, args.min_score)
        X = Features.build([t for t, _, _ in rows])
        model, table = select_and_fit(X, np.array([y for _, y, _ in rows]))
        result = {"cv_selection": table}
    save_model(model, Path(args.out), {"cv_selection": result["cv_selection"]})
    print(f"classifier written to {args.out}", file=sys.stderr)
    return 0


def score_main(argv: list[str] | None = None) -> int:
    from phiforge.data.io import add_io_args, run_units

    ap = ArgumentParser(prog="phiforge data score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(ap)
    ap.add_argument("--model", required=True, help="folder written by train-classifier")
    ap.add_argument("--threshold", type=float, default=None, help="keep P(good) >= this (default: the model's)")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    thr = model.threshold if args.threshold is None else args.threshold

    def process(unit: int, docs: list[dict], stats) -> list[dict]:
        if not docs:
            return []
        prob = model.predict_proba(Features.build([d["text"] for d in docs]))
        stats.add_hist("quality_score", prob, np.linspace(0, 1, 41))
        stats.remove("below_quality_threshold", int((prob < thr).sum()))
        return [{**d, "quality_score": round(float(p), 4)} for d, p in zip(docs, prob) if p >= thr]

    stats = run_units("score", args.inputs, args.out, process, rank=args.rank, world=args.world,
                      shard_size=args.shard_size, text_key=args.text_key, text_sep=args.text_sep,
                      config={"model": str(args.model), "threshold": thr})
    if stats:
        print(f"score: kept {stats.docs_out}/{stats.docs_in} docs at threshold {thr:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
