"""ARC-Challenge test, as lm-eval `arc_challenge` (same prompt as arc_easy.py)."""
from phiforge.eval.data import jsonl_mc
from phiforge.eval.tasks.arc_easy import DEFAULT_FEWSHOT, METRICS, OUTPUT, to_query  # noqa: F401

FILE = "arc/arc_challenge_test_llmfoundry.jsonl"


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    return jsonl_mc(data_dir, FILE, to_query, num_fewshot, seed)
