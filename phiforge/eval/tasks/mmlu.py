"""MMLU (57 subjects, test split), as lm-eval `mmlu` (lm_eval/tasks/mmlu/default/_default_template_yaml and
_generate_configs.py): description "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
few-shot = the first K dev questions of the same subject (sampler first_n, default K=5 as in the Phi-3 report),
each "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" + " {letter}" + "\\n\\n"; choices " A".." D"; acc.
Aggregates: per subject, per category (lm-eval's 4 groups) and overall, all weighted by size (micro average).
Local data: the original Berkeley CSVs (question, A, B, C, D, answer letter; no header)."""
from pathlib import Path

from phiforge.eval.data import find, mc_doc, read_csv
from phiforge.eval.metrics import aggregate as mean_and_stderr
from phiforge.utils import UserError

OUTPUT, METRICS, DEFAULT_FEWSHOT = "multiple_choice", ["acc"], 5
LETTERS = ["A", "B", "C", "D"]

# lm_eval/tasks/mmlu/_generate_configs.py SUBJECTS (lm-eval 0.4.13)
CATEGORY = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


def read_split(path: Path) -> list[tuple[str, list[str], int]]:
    out = []
    for n, row in enumerate(read_csv(path), 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise UserError(f"malformed record in {path} row {n}: expected question,A,B,C,D,answer-letter")
        out.append((row[0], row[1:5], LETTERS.index(row[5].strip())))
    return out


def format_question(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices)) + "\nAnswer:"


def load(data_dir, num_fewshot: int = 5, seed: int = 1234, subjects: list[str] | None = None) -> list[dict]:
    docs = []
    for subject in subjects or sorted(CATEGORY):
        test = read_split(find(data_dir, f"mmlu/test/{subject}_test.csv"))
        dev = read_split(find(data_dir, f"mmlu/dev/{subject}_dev.csv")) if num_fewshot else []
        if num_fewshot > len(dev):
            raise UserError(f"mmlu/{subject}: {num_fewshot}-shot asked but the dev split has {len(dev)} questions")
        topic = subject.replace("_", " ")
        description = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        shots = [(format_question(q, c), LETTERS[g]) for q, c, g in dev[:num_fewshot]]
        for i, (q, choices, gold) in enumerate(test):
            docs.append(mc_doc(len(docs), format_question(q, choices), LETTERS, gold, shots, description,
                               subject=subject, category=CATEGORY[subject], index_in_subject=i))
    return docs


def select(docs: list[dict], limit: int | None) -> list[dict]:
    """--limit N: the first N questions of every subject (lm-eval applies --limit per subtask)."""
    return docs if limit is None else [d for d in docs if d["index_in_subject"] < limit]


def aggregate(rows: list[dict]) -> dict:
    out = mean_and_stderr(rows, METRICS)
    for key in ("category", "subject"):
        for name in sorted({r[key] for r in rows}):
            sub = [r for r in rows if r[key] == name]
            out[name] = {**mean_and_stderr(sub, METRICS), "n": len(sub)}
    return out
