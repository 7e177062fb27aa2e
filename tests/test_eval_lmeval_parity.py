"""phiforge eval vs lm-evaluation-harness (the reference), offline, on the same tiny model and the same examples.

A random Phi3ForCausalLM (transformers) with a byte-level BPE tokenizer trained here is saved in HF format, twice:
with a tokenizer that adds no special tokens, and with one whose tokenizer.json post-processor prepends <s> (as the
released Phi-3 tokenizer.json does; lm-eval then scores `<s>` + context). lm-eval
runs it with its `hf` backend on task configs that `include` lm-eval's own YAML for mmlu / hellaswag / arc / piqa
(so prompt formats, few-shot sampling and metrics are lm-eval's), only switching the data to local JSON files
rebuilt from ../shared/data in the original datasets' schemas. phiforge evaluates the same folder. Compared:
every prompt and continuation string, every log-likelihood (to 1e-4), and the aggregated acc / acc_norm.

Reference: lm-eval 0.4.13, lm_eval/tasks/{mmlu/default,hellaswag,arc,piqa}/*.yaml, lm_eval/models/huggingface.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import with_bos_post_processor
from phiforge.utils import shared_dir

SHARED = shared_dir()
pytestmark = pytest.mark.skipif(SHARED is None or not (SHARED / "data").is_dir(),
                                reason="needs ../shared/data (benchmark files)")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the reference (test dependency)")

SUBJECTS = ["anatomy", "high_school_us_history", "college_physics"]
LIMIT = 8  # examples per task (per subject for MMLU)


def build_tiny_model(folder: Path, texts: list[str], bos: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from phiforge.tokenizer import train_bpe

    tok = train_bpe(texts, vocab_size=700)
    if bos:
        tok = with_bos_post_processor(tok)
    cfg = Phi3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights large enough that choices get clearly different scores
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.08) if "norm" not in name else p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save(folder)
    adds = AutoTokenizer.from_pretrained(folder)("Question: x").input_ids[0] == tok.bos_id
    assert adds == bos, "the reference tokenizer must (not) add <s> as the variant says"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def lmeval_task_dir(root: Path, data: Path) -> Path:
    """Local-data lm-eval configs: lm-eval's own YAML included, only the dataset switched to local JSON files
    holding the original datasets' fields, rebuilt from the local copies."""
    import csv
    import gzip

    from phiforge.eval.data import read_jsonl

    official = Path(lm_eval.__file__).parent / "tasks"
    cfg_dir = root / "configs"
    cfg_dir.mkdir()

    def task_yaml(name, include, files, extra=""):
        data_files = "".join(f"      {split}: {path}\n" for split, path in files.items())
        (cfg_dir / f"{name}.yaml").write_text(
            f"include: {include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}{extra}")

    for subject in SUBJECTS:  # cais/mmlu schema: question, subject, choices, answer (int)
        files = {}
        for split in ("test", "dev"):
            rows = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(open(data / f"mmlu/{split}/{subject}_{split}.csv", encoding="utf-8"))]
            files[split] = write_jsonl(root / f"mmlu_{subject}_{split}.jsonl", rows)
        task_yaml(f"ref_mmlu_{subject}", official / f"mmlu/default/mmlu_{subject}.yaml", files, "num_fewshot: 5\n")

    for name in ("arc_easy", "arc_challenge"):  # allenai/ai2_arc schema
        rows = [{"question": r["query"][len("Question: "):], "answerKey": "ABCD"[r["gold"]],
                 "choices": {"text": r["choices"], "label": ["A", "B", "C", "D"]}}
                for r in read_jsonl(data / f"arc/{name}_test_llmfoundry.jsonl")]
        task_yaml(f"ref_{name}", official / f"arc/{name}.yaml", {"test": write_jsonl(root / f"{name}.jsonl", rows)},
                  "training_split: null\nvalidation_split: null\n")

    rows = [{"goal": r["query"][len("Question: "):-1], "sol1": r["choices"][0], "sol2": r["choices"][1],
             "label": r["gold"]} for r in read_jsonl(data / "piqa/piqa_valid_llmfoundry.jsonl")]
    task_yaml("ref_piqa", official / "piqa/piqa.yaml", {"validation": write_jsonl(root / "piqa.jsonl", rows)},
              "training_split: null\n")

    lines = gzip.open(data / "hellaswag/hellaswag_val_full.txt.gz", "rt", encoding="utf-8").read().split("\n")
    rows = []
    for k in range(0, 6 * 200, 6):  # Rowan/hellaswag schema; lm-eval rebuilds "{label}: {ctx_a} {Ctx_b}"
        label, ctx = lines[k].split(": ", 1)
        rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[k + 2:k + 6],
                     "label": lines[k + 1]})
    task_yaml("ref_hellaswag", official / "hellaswag/hellaswag.yaml",
              {"validation": write_jsonl(root / "hellaswag.jsonl", rows)}, "training_split: null\n")
    return cfg_dir


@pytest.fixture(scope="module", params=["no_bos", "bos"])
def runs(request, tmp_path_factory):
    """Per tokenizer, one lm-eval run and one phiforge run over all the compared tasks (lm-eval start-up is the
    slow part)."""
    import phiforge.eval.tasks.mmlu as mmlu
    from phiforge.eval.tasks import arc_easy

    root = tmp_path_factory.mktemp(f"lmeval_{request.param}")
    data = SHARED / "data"
    texts = [p[0] + p[1] for d in mmlu.load(data, 5, subjects=SUBJECTS)[:30] for p in d["pairs"][:1]]
    texts += [p[0] + p[1] for d in arc_easy.load(data)[:300] for p in d["pairs"]]
    build_tiny_model(root / "model", texts, bos=request.param == "bos")
    cfg_dir = lmeval_task_dir(root, data)
    ref = run_lmeval(root / "model", cfg_dir, [f"ref_{t}" for t in ZERO_SHOT] + [f"ref_mmlu_{s}" for s in SUBJECTS],
                     root / "hf_cache")
    real_load = mmlu.load
    mmlu.load = lambda *a, **k: real_load(*a, **k, subjects=SUBJECTS)
    try:
        results, samples = run_phiforge(root / "model", data, ZERO_SHOT + ["mmlu"], root / "r.json")
    finally:
        mmlu.load = real_load
    return ref, results, samples


def run_lmeval(model_dir: Path, cfg_dir: Path, tasks: list[str], cache: Path) -> dict:
    """lm-eval offline: no Hub access, a throwaway datasets cache; the environment is restored afterwards."""
    offline = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(cache), HF_HOME=str(cache))
    saved = {k: os.environ.get(k) for k in offline}
    os.environ.update(offline)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        return simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                               batch_size=4, limit=LIMIT, log_samples=True, device="cpu",
                               task_manager=TaskManager(include_path=str(cfg_dir), include_defaults=False),
                               random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_phiforge(model_dir: Path, data: Path, tasks: list[str], out: Path) -> tuple[dict, list]:
    from phiforge.eval.harness import main

    assert main([str(model_dir), "--tasks", ",".join(tasks), "--data-dir", str(data), "--limit", str(LIMIT),
                 "--out", str(out), "--batch-size", "4"]) == 0
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return json.loads(out.read_text())["results"], samples


def compare(ref_samples: list[dict], ours: list[dict], metrics: list[str]) -> float:
    """Asserts the pairs, log-likelihoods and metrics agree; returns the largest log-likelihood difference."""
    ref_samples = sorted(ref_samples, key=lambda s: s["doc_id"])
    assert len(ref_samples) == len(ours) == LIMIT
    worst = 0.0
    for ref, mine in zip(ref_samples, ours):
        ref_pairs = [tuple(a) for a in ref["arguments"]]
        mine_pairs = [(mine["context"], c) for c in mine["continuations"]]
        assert mine_pairs == ref_pairs, "prompt strings differ from lm-eval's"
        ref_lls = [float(r[0]) for r in ref["filtered_resps"]]
        assert mine["loglikelihoods"] == pytest.approx(ref_lls, abs=1e-4)
        worst = max([worst, *(abs(a - b) for a, b in zip(mine["loglikelihoods"], ref_lls))])
        for m in metrics:
            assert mine[m] == ref[m], f"{m} differs on doc {ref['doc_id']}"
    return worst


ZERO_SHOT = ["arc_easy", "arc_challenge", "piqa", "hellaswag"]


@pytest.mark.parametrize("task", ZERO_SHOT)
def test_zero_shot_tasks_match_lm_eval(runs, task):
    ref, results, samples = runs
    r = f"ref_{task}"
    worst = compare(ref["samples"][r], [s for s in samples if s["task"] == task], ["acc", "acc_norm"])
    print(f"\n{task}: max |loglikelihood - lm-eval's| {worst:.2e}")
    for m in ("acc", "acc_norm"):
        assert results[task][m] == pytest.approx(ref["results"][r][f"{m},none"], abs=1e-3)
        assert results[task][f"{m}_stderr"] == pytest.approx(ref["results"][r][f"{m}_stderr,none"], abs=1e-6)


def test_mmlu_five_shot_matches_lm_eval(runs):
    ref, results, samples = runs
    refs = [f"ref_mmlu_{s}" for s in SUBJECTS]
    for subject in SUBJECTS:
        mine = [s for s in samples if s["task"] == "mmlu" and s["subject"] == subject]
        worst = compare(ref["samples"][f"ref_mmlu_{subject}"], mine, ["acc"])
        print(f"\nmmlu/{subject}: max |loglikelihood - lm-eval's| {worst:.2e}")
        assert results["mmlu"][subject]["acc"] == pytest.approx(ref["results"][f"ref_mmlu_{subject}"]["acc,none"],
                                                               abs=1e-3)
    overall = sum(ref["results"][r]["acc,none"] for r in refs) / len(refs)  # equal sizes: micro == macro
    assert results["mmlu"]["acc"] == pytest.approx(overall, abs=1e-3)
    assert results["mmlu"]["num_fewshot"] == 5
    assert set(results["mmlu"]) >= {"stem", "humanities", *SUBJECTS}


def test_comparison_is_not_vacuous(runs):
    """The tiny model must tell choices apart, or matching accuracies would prove little."""
    _, _, samples = runs
    spreads = [max(s["loglikelihoods"]) - min(s["loglikelihoods"]) for s in samples]
    assert sum(x > 0.05 for x in spreads) > 0.8 * len(spreads)
    assert 0 < sum(s["acc"] for s in samples) < len(samples)
