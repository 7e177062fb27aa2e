"""Quality classifier: beats the best single heuristic on held-out human/LLM labels; train -> save -> score stage."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from phiforge.data import classify
from phiforge.data.classify import Features, fit, is_heldout, load_labels, prf
from phiforge.data.io import read_jsonl
from phiforge.utils import UserError, shared_dir

os.environ["PHIFORGE_NO_PROGRESS"] = "1"


def labels_dir():
    s = shared_dir()
    if s is None or not (s / "data" / "quality_labels").is_dir():
        pytest.skip("needs ../shared/data/quality_labels (DCLM human labels + FineWeb-Edu Llama-3.3 scores)")
    return s / "data" / "quality_labels"


def test_classifier_beats_best_single_heuristic_on_heldout(tmp_path):
    d = labels_dir()
    assert classify.train_main([str(d), "--out", str(tmp_path / "clf"), "--eval"]) == 0
    r = json.loads((tmp_path / "clf" / "eval.json").read_text())
    c, best = r["classifier"], r["heuristics"][r["best_heuristic"]]
    print(f"\nclassifier P={c['precision']} R={c['recall']} F1={c['f1']} ({c['features']}, thr {c['threshold']:.3f})")
    for k, v in r["heuristics"].items():
        print(f"heuristic {k:24s} P={v['precision']} R={v['recall']} F1={v['f1']}")
    assert r["heldout"] >= 100 and r["train"] >= 250
    # the best heuristic is picked *on the held-out split* (favouring it); the classifier's settings are not
    assert c["f1"] > best["f1"]
    assert (tmp_path / "clf" / "model.safetensors").exists()


def test_split_is_deterministic_and_labels_parse(tmp_path):
    assert is_heldout("some text") == is_heldout("some text")
    frac = np.mean([is_heldout(f"doc {i}") for i in range(2000)])
    assert 0.26 < frac < 0.34
    rows = [{"text": "a", "score": 4}, {"text": "b", "label": 0}, {"text": "c"}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_labels([str(tmp_path / "l.jsonl")]) == [("a", 1, 4.0), ("b", 0, 0.0)]
    with pytest.raises(UserError):
        load_labels([str(tmp_path / "missing")])


def test_train_save_score_stage(tmp_path):
    rng = np.random.default_rng(0)
    good = ["The cell is the basic unit of life. Plants make food from sunlight, water and carbon dioxide. "
            f"Students can test this with a leaf experiment number {i}." for i in range(40)]
    bad = [f"BUY NOW!!! cheap pills {i} click here $$$ best price win win win" for i in range(40)]
    texts, y = good + bad, np.array([1] * 40 + [0] * 40)
    m = fit(Features.build(texts), y, 1e-3, True, True)
    assert prf(y, (m.predict_proba(Features.build(texts)) >= 0.5).astype(int))["f1"] == 1.0
    classify.save_model(m, tmp_path / "clf", {})
    m2 = classify.load_model(tmp_path / "clf")
    X = Features.build(texts)
    assert np.allclose(m.predict_proba(X), m2.predict_proba(X), atol=1e-5)
    inp = tmp_path / "in.jsonl"
    order = rng.permutation(80)
    inp.write_text("".join(json.dumps({"text": texts[i], "id": str(i)}) + "\n" for i in order) + "not json\n")
    classify.score_main([str(inp), "--out", str(tmp_path / "scored"), "--model", str(tmp_path / "clf"),
                         "--threshold", "0.5"])
    kept = list(read_jsonl(tmp_path / "scored" / "00000.jsonl.gz"))
    assert sorted(int(d["id"]) for d in kept) == list(range(40)) and all(d["quality_score"] >= 0.5 for d in kept)
    st = json.loads((tmp_path / "scored" / "stats.json").read_text())
    assert sum(st["hist"]["quality_score"]["counts"]) == 80 and st["malformed"] == 1
    with pytest.raises(UserError, match="no classifier"):
        classify.load_model(tmp_path)
