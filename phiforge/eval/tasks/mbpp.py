"""MBPP (sanitized, test split: task_ids 11-510), pass@1 greedy, in lm-eval `mbpp`'s format
(lm_eval/tasks/mbpp/mbpp.yaml and utils.py): 3 fixed few-shot problems (task_ids 2, 3, 4) as
"You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\\n\\n
{3 asserts}\\n[BEGIN]\\n{code}\\n[DONE]", generation until "[DONE]"; the completion + its test_imports + asserts run
in the sandbox. Sanitized MBPP calls the description `prompt` (lm-eval's full split calls it `text`)."""
from phiforge.eval.data import find, read_json, require
from phiforge.eval.sandbox import run_many
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "generate", ["pass@1"], 3
FILE = "mbpp/sanitized-mbpp.json"
TIMEOUT = 3.0
TEST_IDS = range(11, 511)  # the MBPP test split

# lm_eval/tasks/mbpp/utils.py list_fewshot_samples(): (text, code, test_list) of task_ids 2, 3, 4
FEWSHOT = [
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"]),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums",
     ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]),
]


def question(text: str, tests: list[str]) -> str:
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            f"tests:\n\n" + "\n".join(tests[:3]) + "\n[BEGIN]\n")


def load(data_dir, num_fewshot: int = 3, seed: int = 1234) -> list[dict]:
    if num_fewshot > len(FEWSHOT):
        raise UserError(f"mbpp has {len(FEWSHOT)} few-shot problems; --num-fewshot {num_fewshot} is too many")
    p = find(data_dir, FILE)
    raw = read_json(p)
    if not isinstance(raw, list):
        raise UserError(f"malformed file {p}: expected a JSON array of problems")
    shots = "".join(question(t, tests) + code + "\n[DONE]\n\n" for t, code, tests in FEWSHOT[:num_fewshot])
    docs = []
    for n, r in enumerate(raw):
        require(r, {"task_id": int, "prompt": str, "code": str, "test_list": list}, f"{p} item {n}")
        if r["task_id"] in TEST_IDS:
            docs.append({"id": r["task_id"], "prompt": shots + question(r["prompt"], r["test_list"]),
                         "until": ["[DONE]"], "max_gen_toks": 512, "code": r["code"],
                         "tests": "\n".join(r.get("test_imports", []) + r["test_list"])})
    return docs


def score(docs: list[dict], outputs: list[str], timeout: float = TIMEOUT) -> list[dict]:
    results = run_many([o + "\n" + d["tests"] for d, o in zip(docs, outputs)], timeout=timeout)
    return [{"pass@1": float(r.passed), "status": r.status, "error": r.stderr[-300:]} for r in results]
