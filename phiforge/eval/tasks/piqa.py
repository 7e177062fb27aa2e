"""PIQA validation, as lm-eval `piqa` (lm_eval/tasks/piqa/piqa.yaml): "Question: {goal}\\nAnswer:" + " {sol}",
acc and acc_norm. MosaicML's query is "Question: {goal}\\n", so the prompt is the query + "Answer:"."""
from phiforge.eval.data import jsonl_mc, strip_prefix
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc", "acc_norm"], 0
FILE = "piqa/piqa_valid_llmfoundry.jsonl"


def to_query(query: str, where: str) -> str:
    strip_prefix(query, "Question: ", where)
    if not query.endswith("\n"):
        raise UserError(f"malformed record {where}: query should end with a newline")
    return query + "Answer:"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    return jsonl_mc(data_dir, FILE, to_query, num_fewshot, seed)
