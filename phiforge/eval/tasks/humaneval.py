"""HumanEval (164 problems), pass@1 with greedy decoding, as lm-eval `humaneval` (lm_eval/tasks/humaneval/): the
prompt is the function signature + docstring, generation stops at "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint";
the program prompt + completion + "\\n" + test + "\\ncheck(entry_point)" must exit cleanly in the sandbox within
3 s (human-eval's timeout). Local data: openai/human-eval HumanEval.jsonl.gz."""
from phiforge.eval.data import find, read_jsonl, require
from phiforge.eval.sandbox import run_many

OUTPUT, METRICS, DEFAULT_FEWSHOT = "generate", ["pass@1"], 0
FILE = "humaneval/HumanEval.jsonl.gz"
UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
TIMEOUT = 3.0


def load(data_dir, num_fewshot: int = 0, seed: int = 1234) -> list[dict]:
    p = find(data_dir, FILE)
    docs = []
    for n, r in enumerate(read_jsonl(p), 1):
        require(r, {"task_id": str, "prompt": str, "canonical_solution": str, "test": str, "entry_point": str},
                f"{p} line {n}")
        docs.append({"id": r["task_id"], "prompt": r["prompt"], "until": UNTIL, "max_gen_toks": 1024,
                     "test": r["test"], "entry_point": r["entry_point"], "canonical_solution": r["canonical_solution"]})
    return docs


def program(doc: dict, completion: str) -> str:
    return doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})"


def score(docs: list[dict], outputs: list[str], timeout: float = TIMEOUT) -> list[dict]:
    results = run_many([program(d, o) for d, o in zip(docs, outputs)], timeout=timeout)
    return [{"pass@1": float(r.passed), "status": r.status, "error": r.stderr[-300:]} for r in results]
