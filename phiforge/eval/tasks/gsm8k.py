"""GSM8K test, chain-of-thought few-shot, as lm-eval `gsm8k_cot` (lm_eval/tasks/gsm8k/gsm8k-cot.yaml): the 8 fixed
exemplars of Wei et al. 2022 as "Q: {question}\\nA: {reasoning} The answer is N.\\n\\n", the question as
"Q: {question}\\nA:", greedy until "Q:"; strict-match takes "The answer is (N)." and flexible-extract the last
number; exact_match ignores case, commas, "$", a trailing "." and anything up to "#### ". Target: the number after
"####" in the answer. Local data: openai/grade-school-math test.jsonl."""
from phiforge.eval.data import find, read_jsonl, require
from phiforge.eval.metrics import exact_match, regex_extract
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "generate", ["exact_match_strict", "exact_match_flexible"], 8
FILE = "gsm8k/gsm8k_test.jsonl"
UNTIL = ["Q:", "</s>", "<|im_end|>"]
STRICT, FLEXIBLE = r"The answer is (\-?[0-9\.\,]+).", r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = [",", r"\$", "(?s).*#### ", r"\.$"]

# lm_eval/tasks/gsm8k/gsm8k-cot.yaml fewshot_config.samples (Wei et al. 2022, Table 20)
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
]


def load(data_dir, num_fewshot: int = 8, seed: int = 1234) -> list[dict]:
    if num_fewshot > len(EXEMPLARS):
        raise UserError(f"gsm8k has {len(EXEMPLARS)} chain-of-thought exemplars; --num-fewshot {num_fewshot} is too many")
    p = find(data_dir, FILE)
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:num_fewshot])
    docs = []
    for n, r in enumerate(read_jsonl(p), 1):
        require(r, {"question": str, "answer": str}, f"{p} line {n}")
        if "####" not in r["answer"]:
            raise UserError(f"malformed record {p} line {n}: answer has no '#### <number>'")
        docs.append({"id": n - 1, "prompt": f"{shots}Q: {r['question']}\nA:", "until": UNTIL, "max_gen_toks": 256,
                     "target": r["answer"].split("####")[-1].strip()})
    return docs


def score(docs: list[dict], outputs: list[str]) -> list[dict]:
    rows = []
    for d, out in zip(docs, outputs):
        strict, flexible = regex_extract(out, STRICT), regex_extract(out, FLEXIBLE, group_select=-1)
        rows.append({"strict": strict, "flexible": flexible,
                     "exact_match_strict": exact_match(strict, d["target"], IGNORE, ignore_case=True),
                     "exact_match_flexible": exact_match(flexible, d["target"], IGNORE, ignore_case=True)})
    return rows
