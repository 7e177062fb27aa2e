"""OpenBookQA main test, as lm-eval `openbookqa` (lm_eval/tasks/openbookqa/openbookqa.yaml): the question stem
alone + " {choice}", acc and acc_norm. MosaicML's query is the stem."""
from phiforge.eval.data import jsonl_mc

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc", "acc_norm"], 0
FILE = "openbookqa/openbookqa_test_llmfoundry.jsonl"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    return jsonl_mc(data_dir, FILE, lambda q, where: q, num_fewshot, seed)
