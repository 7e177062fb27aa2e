"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; prompt as in LongLoRA's passkey_retrivial.py):
a 5-digit key hidden at several depths inside repeated filler text of a given length in tokens
(--context-lengths), then "What is the pass key? The pass key is"; correct iff the greedy answer contains the key.
Accuracy per context length and overall. Needs no data files."""
import random

from phiforge.utils import UserError

OUTPUT, DEFAULT_FEWSHOT = "generate", 0
OPTIONS = ("lm", "context_lengths")
NEEDS_DATA = False
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
METRICS = ["acc"]


def prompt(n_filler: int, depth: float, key: int) -> str:
    before = int(round(n_filler * depth))
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    return "\n".join([INTRO, " ".join([FILLER] * before), info, " ".join([FILLER] * (n_filler - before)), QUESTION])


def load(data_dir, num_fewshot: int = 0, seed: int = 1234, lm=None, context_lengths: str = "1024") -> list[dict]:
    try:
        lengths = [int(x) for x in str(context_lengths).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--context-lengths {context_lengths!r}: expected comma-separated integers") from None
    rnd = random.Random(seed)
    per_filler = lm.count_tokens(" " + FILLER)
    overhead = lm.count_tokens(prompt(0, 0.0, 12345))
    docs = []
    for length in lengths:
        n = max(0, (length - overhead) // per_filler)
        for depth in DEPTHS:
            key = rnd.randint(10000, 99999)
            docs.append({"id": f"{length}@{depth}", "context_length": length, "depth": depth, "key": str(key),
                         "prompt": prompt(n, depth, key), "until": ["\n"], "max_gen_toks": 8})
    return docs


def score(docs: list[dict], outputs: list[str]) -> list[dict]:
    return [{"acc": float(d["key"] in o)} for d, o in zip(docs, outputs)]


def aggregate(rows: list[dict]) -> dict:
    from phiforge.eval.metrics import aggregate as mean_and_stderr

    out = mean_and_stderr(rows, METRICS)
    for length in sorted({r["context_length"] for r in rows}):
        out[f"acc@{length}"] = mean_and_stderr([r for r in rows if r["context_length"] == length], METRICS)["acc"]
    return out
