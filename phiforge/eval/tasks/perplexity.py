"""Perplexity and bits-per-byte of text files (--text-files), as lm-eval's `loglikelihood_rolling` tasks score them
(lm_eval/tasks/wikitext/wikitext.yaml; lm_eval/api/metrics.py `weighted_perplexity`, `bits_per_byte`): the token
log-likelihood of each whole file over disjoint max-length windows, then corpus-level word_perplexity
(per whitespace-separated word), byte_perplexity and bits_per_byte (per UTF-8 byte), plus token_perplexity."""
import math
from pathlib import Path

from tqdm import tqdm

from phiforge.data.io import open_text
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "custom", ["word_perplexity", "byte_perplexity", "bits_per_byte"], 0
OPTIONS = ("text_files",)
NEEDS_DATA = False  # with --text-files; without them load() says what is missing


def read_texts(files: list[str]) -> list[dict]:
    docs = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"missing text file {p}")
        with open_text(p, newline=None) as fh:  # refuses a binary file
            text = fh.read()
        if not text.strip():
            raise UserError(f"text file {p} is empty: nothing to score")
        docs.append({"id": str(p), "text": text})
    return docs


def load(data_dir, num_fewshot: int = 0, seed: int = 1234, text_files: list[str] = ()) -> list[dict]:
    if not text_files:
        raise UserError("the perplexity task needs --text-files FILE [FILE ...]")
    return read_texts(text_files)


def run(lm, docs: list[dict], args=None) -> list[dict]:
    rows = []
    for d in tqdm(docs, desc="perplexity", leave=False):
        logprob, n_tokens = lm.loglikelihood_rolling(d["text"])
        rows.append({"id": d["id"], "logprob": logprob, "tokens": n_tokens, "bytes": len(d["text"].encode("utf-8")),
                     "words": len(d["text"].split())})
    return rows


def aggregate(rows: list[dict]) -> dict:
    nll = -sum(r["logprob"] for r in rows)
    tokens, nbytes, words = (sum(r[k] for r in rows) for k in ("tokens", "bytes", "words"))
    return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / nbytes),
            "bits_per_byte": nll / nbytes / math.log(2), "token_perplexity": math.exp(nll / tokens)}
