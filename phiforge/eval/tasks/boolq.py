"""BoolQ validation, as lm-eval `boolq` (lm_eval/tasks/super_glue/boolq/default.yaml):
"{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes", acc. MosaicML's query is
"Passage: {passage}\\nQuestion: {question}?", so the prompt drops "Passage: " and appends "\\nAnswer:"."""
from phiforge.eval.data import jsonl_mc, strip_prefix

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc"], 0
FILE = "boolq/boolq_val_llmfoundry.jsonl.gz"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    return jsonl_mc(data_dir, FILE, lambda q, where: strip_prefix(q, "Passage: ", where) + "\nAnswer:",
                    num_fewshot, seed)
