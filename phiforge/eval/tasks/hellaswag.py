"""HellaSwag validation, as lm-eval `hellaswag` (lm_eval/tasks/hellaswag/): context
"{activity_label}: {ctx_a} {Ctx_b}" + " {ending}", both run through lm-eval's `preprocess` (strip, "[title]" and
bracket removal, double spaces), acc and acc_norm. The local file is llama.cpp's extraction of the official
hellaswag_val.jsonl, 6 lines per item ("{activity_label}: {ctx}", gold index, 4 endings), with most of that cleanup
applied; lm-eval's `preprocess` runs once more on every line (it changes 14 of 60252 lines, e.g. leftover
"[www.site.org]" brackets), which gives exactly lm-eval's text."""
import re

from phiforge.eval.data import find, mc_doc, sample_fewshot
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc", "acc_norm"], 0
FILE = "hellaswag/hellaswag_val_full.txt.gz"


def preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py `preprocess`, verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    import gzip

    p = find(data_dir, FILE)
    with gzip.open(p, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"malformed file {p}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    items = []
    for k in range(0, len(lines), 6):
        ctx, label, endings = lines[k], lines[k + 1].strip(), lines[k + 2:k + 6]
        if label not in ("0", "1", "2", "3"):
            raise UserError(f"malformed record in {p} at line {k + 2}: label {label!r} is not 0-3")
        items.append((preprocess(ctx), [preprocess(e) for e in endings], int(label)))
    docs = []
    for i, (ctx, endings, gold) in enumerate(items):
        shots = [(s[0], s[1][s[2]]) for s in sample_fewshot(items, i, num_fewshot, seed)] if num_fewshot else []
        docs.append(mc_doc(i, ctx, endings, gold, shots))
    return docs
