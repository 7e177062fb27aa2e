"""`--from-hub`: on a connected machine with `datasets` installed, fetch a task's Hugging Face dataset and write it
under --data-dir in the local format that the task reads (../shared/data/SOURCES.md). Files already there are kept.
The converters are pure functions of Hub records (tested offline); only `fetch` touches the network."""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from phiforge.data.io import write_jsonl
from phiforge.utils import UserError, atomic_write_bytes, atomic_write_text


def arc(r: dict) -> dict:
    return {"query": "Question: " + r["question"], "choices": list(r["choices"]["text"]),
            "gold": list(r["choices"]["label"]).index(r["answerKey"])}


def piqa(r: dict) -> dict:
    return {"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def openbookqa(r: dict) -> dict:
    return {"query": r["question_stem"], "choices": list(r["choices"]["text"]),
            "gold": list(r["choices"]["label"]).index(r["answerKey"].strip())}


def boolq(r: dict) -> dict:
    return {"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
            "gold": int(r["label"])}


def winogrande(r: dict) -> dict:
    i = r["sentence"].index("_")
    return {"context_options": [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
            "continuation": r["sentence"][i + 1:].strip(), "gold": int(r["answer"]) - 1}


def hellaswag_lines(r: dict) -> list[str]:
    ctx = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
    return [ctx, str(int(r["label"])), *r["endings"]]


def mmlu_row(r: dict) -> list[str]:
    return [r["question"], *r["choices"], "ABCD"[int(r["answer"])]]


def identity(r: dict) -> dict:
    return dict(r)


# task -> [(local file, hub dataset, config, split, converter, writer)]
JSONL, JSONL_GZ, JSON_ARRAY = "jsonl", "jsonl.gz", "json"
SOURCES = {
    "arc_easy": [("arc/arc_easy_test_llmfoundry.jsonl", "allenai/ai2_arc", "ARC-Easy", "test", arc, JSONL)],
    "arc_challenge": [("arc/arc_challenge_test_llmfoundry.jsonl", "allenai/ai2_arc", "ARC-Challenge", "test", arc,
                       JSONL)],
    "piqa": [("piqa/piqa_valid_llmfoundry.jsonl", "baber/piqa", None, "validation", piqa, JSONL)],
    "openbookqa": [("openbookqa/openbookqa_test_llmfoundry.jsonl", "allenai/openbookqa", "main", "test", openbookqa,
                    JSONL)],
    "boolq": [("boolq/boolq_val_llmfoundry.jsonl.gz", "aps/super_glue", "boolq", "validation", boolq, JSONL_GZ)],
    "winogrande": [("winogrande/winogrande_dev_llmfoundry.jsonl", "allenai/winogrande", "winogrande_xl", "validation",
                    winogrande, JSONL)],
    "gsm8k": [("gsm8k/gsm8k_test.jsonl", "openai/gsm8k", "main", "test", identity, JSONL)],
    "humaneval": [("humaneval/HumanEval.jsonl.gz", "openai/openai_humaneval", None, "test", identity, JSONL_GZ)],
    "mbpp": [("mbpp/sanitized-mbpp.json", "google-research-datasets/mbpp", "sanitized", "test", identity, JSON_ARRAY)],
}


def _write(path: Path, rows: list, kind: str) -> None:
    if kind in (JSONL, JSONL_GZ):  # the file name says whether to gzip
        write_jsonl(path, rows)
    elif kind == JSON_ARRAY:
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False))
    elif kind == "hellaswag":
        atomic_write_bytes(path, gzip.compress(("\n".join(x for r in rows for x in r) + "\n").encode("utf-8")))
    elif kind == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        atomic_write_text(path, buf.getvalue())


def sources(task: str) -> list[tuple]:
    if task == "hellaswag":
        return [("hellaswag/hellaswag_val_full.txt.gz", "Rowan/hellaswag", None, "validation", hellaswag_lines,
                 "hellaswag")]
    if task == "mmlu":
        from phiforge.eval.tasks.mmlu import CATEGORY
        return [(f"mmlu/{split}/{s}_{split}.csv", "cais/mmlu", s, split, mmlu_row, "csv")
                for s in sorted(CATEGORY) for split in ("test", "dev")]
    return SOURCES.get(task, [])


def _writable(d: Path) -> bool:
    import os
    while not d.exists():
        d = d.parent
    return os.access(d, os.W_OK)


def fetch(task: str, data_dir: str | Path) -> None:
    """Write the task's missing local files from the Hub (needs `datasets` and a network)."""
    todo = [s for s in sources(task) if not (Path(data_dir) / s[0]).exists()]
    if not todo:
        return
    if not _writable(Path(data_dir)):
        raise UserError(f"--from-hub writes into --data-dir, but {data_dir} is not writable")
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("--from-hub needs the `datasets` package (pip install datasets)") from None
    for rel, name, config, split, convert, kind in todo:
        try:
            ds = load_dataset(name, config, split=split)
        except Exception as e:  # offline, gated, renamed: say which one
            raise UserError(f"could not fetch {name} ({config}, {split}) for {rel}: {e}") from None
        path = Path(data_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, [convert(dict(r)) for r in ds], kind)
