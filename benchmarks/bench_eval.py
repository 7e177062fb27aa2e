"""MMLU 5-shot throughput: phiforge eval vs lm-evaluation-harness (`hf` backend) on the same tiny model and the
same questions, in the same run. Both backends are built before timing; the timed part is prompt building,
tokenization, forwards and scoring. Accuracies must agree (same examples, same metric).

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py [--subjects 4 --limit 25 --batch-size 16]

Last line: `bench_eval: 2.34x vs lm-eval (goal >= 2.0x)`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(folder: Path, data: Path, subjects: list[str], hidden: int, layers: int) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phiforge.eval.tasks import mmlu
    from phiforge.tokenizer import train_bpe

    texts = [d["pairs"][0][0] for d in mmlu.load(data, 5, subjects=subjects)]
    tok = train_bpe(texts, vocab_size=2048)
    cfg = Phi3Config(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                     num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                     max_position_embeddings=4096, original_max_position_embeddings=4096, bos_token_id=tok.bos_id,
                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save(folder)


def yaml_tasks(root: Path, data: Path, subjects: list[str]) -> Path:
    """lm-eval's own mmlu YAML per subject, data switched to local JSON in cais/mmlu's schema."""
    import csv
    import json

    import lm_eval

    official = Path(lm_eval.__file__).parent / "tasks/mmlu/default"
    cfg = root / "configs"
    cfg.mkdir()
    for s in subjects:
        files = {}
        for split in ("test", "dev"):
            rows = [{"question": r[0], "subject": s, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(open(data / f"mmlu/{split}/{s}_{split}.csv", encoding="utf-8"))]
            files[split] = root / f"{s}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        (cfg / f"bench_mmlu_{s}.yaml").write_text(
            f"include: {official / f'mmlu_{s}.yaml'}\ntask: bench_mmlu_{s}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {files['test']}\n    dev: {files['dev']}\nnum_fewshot: 5\n")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--limit", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from phiforge import load
    from phiforge.eval import harness
    from phiforge.eval.lm import LocalLM
    from phiforge.eval.tasks import mmlu
    from phiforge.utils import shared_dir

    if shared_dir() is None:
        sys.exit("bench_eval: needs ../shared/data (MMLU)")
    data = shared_dir() / "data"
    subjects = ["abstract_algebra", "anatomy", "college_biology", "high_school_geography", "marketing",
                "philosophy"][:args.subjects]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(HF_DATASETS_CACHE=str(root / "hf"), HF_HOME=str(root / "hf"))
        build(root / "model", data, subjects, args.hidden, args.layers)
        cfg = yaml_tasks(root, data, subjects)
        n = len(subjects) * args.limit

        hflm = HFLM(pretrained=str(root / "model"), dtype="float32", batch_size=args.batch_size, device="cpu")
        tm = TaskManager(include_path=str(cfg), include_defaults=False)
        t0 = time.perf_counter()
        ref = simple_evaluate(model=hflm, tasks=[f"bench_mmlu_{s}" for s in subjects], limit=args.limit,
                              task_manager=tm, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0, verbosity="ERROR")
        t_ref = time.perf_counter() - t0
        ref_acc = sum(ref["results"][f"bench_mmlu_{s}"]["acc,none"] for s in subjects) / len(subjects)

        model, tok = load(str(root / "model"))
        lm = LocalLM(model, tok, batch_size=args.batch_size)
        real_load = mmlu.load
        mmlu.load = lambda *a, **k: real_load(*a, **k, subjects=subjects)
        ns = argparse.Namespace(num_fewshot=None, seed=1234, limit=args.limit, max_gen_toks=None)
        t0 = time.perf_counter()
        with torch.no_grad():
            results, _ = harness.evaluate(lm, ["mmlu"], data, ns)
        t_ours = time.perf_counter() - t0
        mmlu.load = real_load

    ours_acc = results["mmlu"]["acc"]
    print(f"MMLU 5-shot, {len(subjects)} subjects x {args.limit} questions = {n}, model hidden={args.hidden} "
          f"layers={args.layers}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"lm-eval  : {n / t_ref:8.2f} examples/s ({t_ref:.2f} s)  acc={ref_acc:.4f}")
    print(f"phiforge : {n / t_ours:8.2f} examples/s ({t_ours:.2f} s)  acc={ours_acc:.4f}")
    if abs(ref_acc - ours_acc) > 1e-3:
        print(f"WARNING: accuracies differ ({ours_acc:.4f} vs {ref_acc:.4f})")
    print(f"bench_eval: {t_ref / t_ours:.2f}x vs lm-eval (goal >= 2.0x)")


if __name__ == "__main__":
    main()
