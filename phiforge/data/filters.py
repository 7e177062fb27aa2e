"""Heuristic filters: Gopher quality + repetition rules, C4 line rules, length and symbol ratios.

    phiforge data filter ../shared/data/web --out runs/data/filtered --text-sep line
    phiforge data filter in.jsonl.gz --out runs/f --no-c4 --min-words 20

Rules and default thresholds follow Rae et al. 2021 (Gopher, arXiv:2112.11446, appendix A.1.1) and Raffel et al.
2020 (C4, arXiv:1910.10683 section 2.2), with the parameter choices of datatrove's GopherQualityFilter /
GopherRepetitionFilter / C4QualityFilter so that benchmarks/bench_data.py compares like with like. Words are
whitespace-separated tokens (Gopher's definition), not a spaCy tokenization; the repetition n-grams use
normalized words (lowercase, punctuation dropped) hashed in one numpy pass, which is much faster and only
differs on punctuation-heavy text. Every removal is counted by the
name of the first rule that fired, so the report shows what each rule costs.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from phiforge.data.dedup import word_spans
from phiforge.utils import ArgumentParser

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "※", "·", "-", "*", "‣", "⁃")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies")
CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
SYMBOL_WORD_RE = re.compile(r"(?<!\S)[^\w\s]+(?!\S)")  # a whitespace token with no letter, digit or _
NO_ALPHA_WORD_RE = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")  # a token without any letter
NON_ALNUM_RE = re.compile(r"[^\w\s]|_")


@dataclass
class FilterConfig:
    # Gopher quality (Rae et al. A.1.1)
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_len: float = 3.0
    max_avg_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    # Gopher repetition (Rae et al. table A1)
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    top_ngram_max: tuple = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_max: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # C4 line rules (Raffel et al. 2.2)
    c4: bool = True
    c4_min_words_per_line: int = 3
    c4_min_sentences: int = 5
    c4_max_word_len: int = 1000
    # length and symbol ratios of the whole text
    min_chars: int = 0
    max_non_alnum_ratio: float = 0.5  # share of characters that are neither alphanumeric nor whitespace


# ---------------------------------------------------------------- Gopher quality

def gopher_quality(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    """First Gopher quality rule the document breaks, or None. Counting is done by C-level regex passes."""
    n_symbol_only = len(SYMBOL_WORD_RE.findall(text))  # tokens of punctuation only are not words (Gopher)
    n = len(words) - n_symbol_only
    if n < cfg.min_words:
        return "gopher_too_few_words"
    if n > cfg.max_words:
        return "gopher_too_many_words"
    avg = (sum(map(len, words)) - n_symbol_only_chars(text)) / n
    if avg < cfg.min_avg_word_len:
        return "gopher_short_avg_word"
    if avg > cfg.max_avg_word_len:
        return "gopher_long_avg_word"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    lines = text.splitlines()
    if lines:
        if sum(1 for l in lines if l.lstrip().startswith(BULLETS)) / len(lines) > cfg.max_bullet_lines:
            return "gopher_bullet_lines"
        if sum(1 for l in lines if l.rstrip().endswith(ELLIPSES)) / len(lines) > cfg.max_ellipsis_lines:
            return "gopher_ellipsis_lines"
    if 1 - len(NO_ALPHA_WORD_RE.findall(text)) / max(len(words), 1) < cfg.min_alpha_words:
        return "gopher_alpha_words"
    if len(STOP_WORDS.intersection(text.lower().split())) < cfg.min_stop_words:
        return "gopher_stop_words"
    return None


def n_symbol_only_chars(text: str) -> int:
    return sum(map(len, SYMBOL_WORD_RE.findall(text)))


# ---------------------------------------------------------------- Gopher repetition

def dup_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    seen: set[str] = set()
    n_dup = chars_dup = chars = 0
    for it in items:
        chars += len(it)
        if it in seen:
            n_dup += 1
            chars_dup += len(it)
        else:
            seen.add(it)
    return n_dup / max(len(items), 1), chars_dup / max(chars, 1)


def ngram_keys(h: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per word n-gram (a position-weighted mix of word hashes)."""
    m = len(h) - n + 1
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            key = key * np.uint64(0x9E3779B97F4A7C15) + h[k:k + m]
    return key


def gopher_repetition(text: str, cfg: FilterConfig) -> str | None:
    """First Gopher repetition rule the document breaks, or None."""
    paras = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
    frac, char_frac = dup_fraction(paras)
    if frac > cfg.max_dup_para_frac:
        return "gopher_dup_para_frac"
    if char_frac > cfg.max_dup_para_char_frac:
        return "gopher_dup_para_char_frac"
    lines = [l for l in text.splitlines() if l.strip()]
    frac, char_frac = dup_fraction(lines)
    if frac > cfg.max_dup_line_frac:
        return "gopher_dup_line_frac"
    if char_frac > cfg.max_dup_line_char_frac:
        return "gopher_dup_line_char_frac"
    # n-grams over normalized words (lowercase, punctuation dropped), hashed with numpy in one pass
    ids, starts, ends = word_spans(text)
    if len(ids) < 2:
        return None
    lens = ends - starts
    total = lens.sum()
    words = ids
    for n, limit in cfg.top_ngram_max:
        if len(words) < n:
            break
        keys = ngram_keys(ids, n)
        uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
        top = counts.argmax()
        # Gopher: characters in the most frequent n-gram times its count, over all characters.
        if counts[top] > 1 and lens[first[top]:first[top] + n].sum() * counts[top] / total > limit:
            return f"gopher_top_{n}gram"
    for n, limit in cfg.dup_ngram_max:
        if len(words) < n:
            break
        keys = ngram_keys(ids, n)
        _, first = np.unique(keys, return_index=True)
        repeat = np.ones(len(keys), dtype=bool)
        repeat[first] = False  # every occurrence after the first of an n-gram is a duplicate
        if not repeat.any():
            break  # no repeated n-gram means no repeated longer one either
        # words covered by any duplicate occurrence, counted once
        covered = np.convolve(repeat.astype(np.int8), np.ones(n, dtype=np.int8))[:len(words)] > 0
        if lens[covered].sum() / total > limit:
            return f"gopher_dup_{n}gram"
    return None


# ---------------------------------------------------------------- C4

def c4_lines(text: str, cfg: FilterConfig, removed: Counter | None = None) -> tuple[str | None, str]:
    """Apply C4's line rules. Returns (document-level removal reason or None, the text with bad lines dropped)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return "c4_lorem_ipsum", text
    if "{" in text:
        return "c4_curly_bracket", text
    kept = []
    for line in text.splitlines():
        line = CITATION_RE.sub("", line).strip()
        if not line:
            continue
        words = line.split()
        if any(len(w) > cfg.c4_max_word_len for w in words):
            reason = "c4_line_long_word"
        elif not line.endswith(TERMINAL_PUNCT) or line.endswith(ELLIPSES):
            reason = "c4_line_no_terminal_punct"
        elif len(words) < cfg.c4_min_words_per_line:
            reason = "c4_line_few_words"
        elif "javascript" in line.lower():
            reason = "c4_line_javascript"
        elif any(p in line.lower() for p in POLICY_PHRASES):
            reason = "c4_line_policy"
        else:
            kept.append(line)
            continue
        if removed is not None:
            removed[reason] += 1
    new = "\n".join(kept)
    # C4 counts sentences with a tokenizer; terminal punctuation followed by space/end is a close proxy.
    if len(re.findall(r"[.!?][\"'”’)]*(?:\s|$)", new)) < cfg.c4_min_sentences:
        return "c4_too_few_sentences", new
    return None, new


# ---------------------------------------------------------------- length and symbols

def ratios(text: str, cfg: FilterConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return "too_short_chars"
    non_space = len("".join(text.split()))
    if non_space and NON_ALNUM_RE.subn("", text)[1] / non_space > cfg.max_non_alnum_ratio:
        return "symbol_ratio"
    return None


def filter_doc(text: str, cfg: FilterConfig, line_removed: Counter | None = None) -> tuple[str | None, str]:
    """Run every rule in datatrove's FineWeb order (repetition, quality, C4). Returns (reason or None, new text)."""
    reason = ratios(text, cfg)
    if reason:
        return reason, text
    words = text.split()
    reason = gopher_repetition(text, cfg) or gopher_quality(text, words, cfg)
    if reason or not cfg.c4:
        return reason, text
    return c4_lines(text, cfg, line_removed)


def all_rule_results(text: str, cfg: FilterConfig) -> dict[str, bool]:
    """Every rule family evaluated on its own (True = document passes). Used to rank single heuristics."""
    words = text.split()
    c4_reason, _ = c4_lines(text, cfg)
    return {
        "gopher_quality": gopher_quality(text, words, cfg) is None,
        "gopher_repetition": gopher_repetition(text, cfg) is None,
        "c4": c4_reason is None,
        "symbol_ratio": ratios(text, cfg) is None,
    }


def process(docs: list[dict], stats, cfg: FilterConfig) -> list[dict]:
    kept = []
    line_removed: Counter = Counter()
    n_words = []
    for d in docs:
        reason, text = filter_doc(d["text"], cfg, line_removed)
        n_words.append(len(d["text"].split()))
        if reason:
            stats.remove(reason)
        else:
            kept.append({**d, "text": text})
    stats.extra.update({f"lines_removed.{k}": v for k, v in line_removed.items()})
    if n_words:
        stats.add_hist("words_per_doc(log10)", np.log10(np.maximum(n_words, 1)), np.linspace(0, 5, 51))
    return kept


def main(argv: list[str] | None = None) -> int:
    from phiforge.data.io import add_io_args, run_units

    ap = ArgumentParser(prog="phiforge data filter", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_io_args(ap)
    ap.add_argument("--no-c4", action="store_true", help="skip the C4 line rules")
    ap.add_argument("--min-words", type=int, default=FilterConfig.min_words)
    ap.add_argument("--max-non-alnum-ratio", type=float, default=FilterConfig.max_non_alnum_ratio)
    args = ap.parse_args(argv)
    cfg = FilterConfig(c4=not args.no_c4, min_words=args.min_words, max_non_alnum_ratio=args.max_non_alnum_ratio)
    stats = run_units("filter", args.inputs, args.out, lambda unit, docs, st: process(docs, st, cfg), rank=args.rank,
                      world=args.world, shard_size=args.shard_size, text_key=args.text_key, text_sep=args.text_sep,
                      config=asdict(cfg))
    if stats:
        print(f"filter: kept {stats.docs_out}/{stats.docs_in} docs, malformed {stats.malformed}, "
              f"removed {dict(sorted(stats.removed.items(), key=lambda kv: -kv[1]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
