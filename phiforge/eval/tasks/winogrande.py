"""WinoGrande (xl) dev, as lm-eval `winogrande` (lm_eval/tasks/winogrande/preprocess_winogrande.py): partial
scoring, one context per option (sentence up to the blank with the option filled in) and the same continuation
" {rest of sentence}", acc. MosaicML's {context_options, continuation, gold} is exactly that split."""
from phiforge.eval.data import check_gold, find, read_jsonl, require, sample_fewshot

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc"], 0
FILE = "winogrande/winogrande_dev_llmfoundry.jsonl"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    p = find(data_dir, FILE)
    raw = read_jsonl(p)
    for n, r in enumerate(raw, 1):
        require(r, {"context_options": list, "continuation": str, "gold": int}, f"{p} line {n}")
        check_gold(r["gold"], len(r["context_options"]), f"{p} line {n}")
    docs = []
    for i, r in enumerate(raw):
        # lm-eval few-shot turn for multiple-input tasks: the gold context + " " + continuation + "\n\n"
        prefix = "".join(f"{s['context_options'][s['gold']]} {s['continuation']}\n\n"
                         for s in sample_fewshot(raw, i, num_fewshot, seed)) if num_fewshot else ""
        opts = r["context_options"]
        docs.append({"id": i, "pairs": [(prefix + o, " " + r["continuation"]) for o in opts],
                     "choice_lens": [len(o) for o in opts], "gold": r["gold"]})
    return docs
