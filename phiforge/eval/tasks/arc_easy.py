"""ARC-Easy test, as lm-eval `arc_easy` (lm_eval/tasks/arc/arc_easy.yaml): "Question: {q}\\nAnswer:" + " {choice}",
acc and acc_norm. Local data is MosaicML's re-packaging whose query is "Question: {q}", so the prompt is the
query + "\\nAnswer:"."""
from phiforge.eval.data import jsonl_mc, strip_prefix

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc", "acc_norm"], 0
FILE = "arc/arc_easy_test_llmfoundry.jsonl"


def to_query(query: str, where: str) -> str:
    return "Question: " + strip_prefix(query, "Question: ", where) + "\nAnswer:"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    return jsonl_mc(data_dir, FILE, to_query, num_fewshot, seed)
