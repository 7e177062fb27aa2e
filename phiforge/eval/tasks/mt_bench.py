"""MT-bench (80 two-turn questions), single-answer grading as FastChat's llm_judge does it
(fastchat/llm_judge/gen_model_answer.py, gen_judgment.py, common.py @ 0e6d3e4): the model answers turn 1, then
turn 2 with its own first answer in the conversation (chat template from phiforge.tokenizer, up to 1024 new
tokens); a judge behind any OpenAI-compatible endpoint (--judge-url, --judge-model, key from --judge-key-env)
grades each turn with FastChat's prompts from mt_bench/judge_prompts.jsonl: single-v1 / single-v1-multi-turn,
and single-math-v1(-multi-turn) with GPT-4 reference answers for math, reasoning and coding; temperature 0,
2048 tokens; the rating is parsed from "[[r]]" (fallback "[r]"), -1 when absent and then left out of the mean.
Deviation: answers are greedy in every category (FastChat samples writing/roleplay at T=0.7, stem/humanities at
0.1), so runs are deterministic."""
import re

from tqdm import tqdm

from phiforge.eval.data import find, read_jsonl, require
from phiforge.eval.metrics import aggregate as mean_and_stderr
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "custom", ["score", "score_turn1", "score_turn2"], 0
OPTIONS = ("judge_url",)
NEED_REF = ("math", "reasoning", "coding")
SCORE, SCORE_BACKUP = re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]")
MAX_NEW_TOKENS = 1024


def load(data_dir, num_fewshot: int = 0, seed: int = 1234, judge_url: str | None = None) -> list[dict]:
    if not judge_url:
        raise UserError("mt_bench needs a judge: --judge-url URL (OpenAI-compatible) [--judge-model gpt-4]")
    qpath = find(data_dir, "mt_bench/question.jsonl")
    ref_file = find(data_dir, "mt_bench/reference_answer_gpt-4.jsonl")
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(ref_file)}
    docs = []
    for n, q in enumerate(read_jsonl(qpath), 1):
        require(q, {"question_id": int, "category": str, "turns": list}, f"{qpath} line {n}")
        if len(q["turns"]) != 2:
            raise UserError(f"malformed record {qpath} line {n}: expected 2 turns")
        if q["category"] in NEED_REF and q["question_id"] not in refs:
            raise UserError(f"mt_bench question {q['question_id']} ({q['category']}) has no reference answer")
        docs.append({"id": q["question_id"], "category": q["category"], "turns": q["turns"],
                     "reference": refs.get(q["question_id"])})
    return docs


def judge_prompts(data_dir) -> dict:
    p = find(data_dir, "mt_bench/judge_prompts.jsonl")
    return {r["name"]: r for r in read_jsonl(p)}


def answer(lm, turns: list[str]) -> list[str]:
    messages, answers = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        answers.append(lm.chat(messages, MAX_NEW_TOKENS).strip())
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def judge_messages(prompts: dict, doc: dict, answers: list[str], turn: int) -> list[dict]:
    ref = doc["category"] in NEED_REF
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    kw = {"ref_answer_1": doc["reference"][0], **({"ref_answer_2": doc["reference"][1]} if turn == 2 else {})} \
        if ref else {}
    if turn == 1:
        user = p["prompt_template"].format(question=doc["turns"][0], answer=answers[0], **kw)
    else:
        user = p["prompt_template"].format(question_1=doc["turns"][0], question_2=doc["turns"][1],
                                           answer_1=answers[0], answer_2=answers[1], **kw)
    return [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str) -> float:
    m = SCORE.search(judgment) or SCORE_BACKUP.search(judgment)
    return float(m.group(1)) if m else -1.0


def run(lm, docs: list[dict], args) -> list[dict]:
    from phiforge.eval.openai_backend import judge_client

    judge = judge_client(args.judge_url, args.judge_model, args.judge_key_env)
    prompts = judge_prompts(args.data_dir)
    rows = []
    for d in tqdm(docs, desc="mt_bench", leave=False):
        answers = answer(lm, d["turns"])
        row = {"id": d["id"], "category": d["category"], "turns": d["turns"], "answers": answers}
        for turn in (1, 2):
            judgment = judge.chat(judge_messages(prompts, d, answers, turn), max_new_tokens=2048)
            rating = parse_rating(judgment)
            row[f"judgment_turn{turn}"] = judgment
            row[f"score_turn{turn}"] = rating if rating >= 0 else None
        rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> dict:
    turns = [{"score": r[f"score_turn{t}"]} for r in rows for t in (1, 2)]
    out = {**mean_and_stderr(turns, ["score"]), **mean_and_stderr(rows, ["score_turn1", "score_turn2"])}
    out["unparsed_judgments"] = sum(r is None for t in turns for r in [t["score"]])
    for cat in sorted({r["category"] for r in rows}):
        sub = [{"score": r[f"score_turn{t}"]} for r in rows if r["category"] == cat for t in (1, 2)]
        out[cat] = mean_and_stderr(sub, ["score"]).get("score")
    return out
