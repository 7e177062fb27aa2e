"""`phiforge recipe`: config precedence, the embedded corpus builders, and the --smoke recipe end to end (CI): it
finishes, its loss curves fall, its evaluation table is filled, a rerun skips every stage, and a run killed in the
middle of a stage (SIGKILL) finishes, after a rerun, with the same report."""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phiforge import recipe, recipe_data
from phiforge.utils import UserError
from tests.conftest import SMOKE_LIMIT_S, run_recipe

ROOT = Path(__file__).resolve().parent.parent


def report_without_timings(out: Path) -> str:
    return re.sub(r"^Stage times.*$", "", (out / "report.md").read_text(), flags=re.M)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_recipe_files_match_the_embedded_defaults():
    assert yaml.safe_load((ROOT / "recipes/default.yaml").read_text()) == recipe.DEFAULTS
    assert yaml.safe_load((ROOT / "recipes/smoke.yaml").read_text()) == recipe.SMOKE


def test_precedence_defaults_smoke_yaml_flags(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("pretrain: {max_steps: 7, lr: 0.01}\ntokenizer: {vocab_size: 600}\n")
    ns = recipe.build_parser().parse_args(["--smoke", "--recipe", str(y), "--set", "pretrain.lr=0.5", "--data", "a.txt",
                                           "--threads", "3"])
    cfg = recipe.resolve(ns)
    assert cfg["pretrain"]["max_steps"] == 7  # YAML over smoke
    assert cfg["pretrain"]["lr"] == 0.5  # flag over YAML
    assert cfg["pretrain"]["seq_len"] == recipe.SMOKE["pretrain"]["seq_len"]  # smoke over defaults
    assert cfg["pretrain"]["model_args"]["num_attention_heads"] == 4  # deep merge keeps untouched keys
    assert cfg["sft"]["lr"] == recipe.DEFAULTS["sft"]["lr"]
    assert cfg["tokenizer"]["vocab_size"] == 600 and cfg["data"] == ["a.txt"] and cfg["threads"] == 3
    with pytest.raises(UserError, match="did you mean"):
        recipe.merge(recipe.DEFAULTS, {"tokeniser": {}})
    with pytest.raises(UserError, match="unknown recipe key"):
        recipe.merge(recipe.DEFAULTS, {"eval": {"limits": 3}})
    recipe.merge(recipe.DEFAULTS, {"pretrain": {"any_pretrain_key": 1}})  # checked by `phiforge pretrain` itself


def test_phases_become_step_bounds(tmp_path):
    ctx = recipe.Ctx(recipe.merge(recipe.DEFAULTS, {"pretrain": {"max_steps": 50}}), tmp_path, verbose=False)
    (ctx.data).mkdir(parents=True)
    (ctx.data / "textbook.jsonl.gz").write_bytes(b"")
    pre = recipe.pretrain_config(ctx)
    assert [p["name"] for p in pre["phases"]] == ["phase1", "phase2"]
    assert pre["phases"][0]["until_step"] == 30 and "until_step" not in pre["phases"][1]
    assert set(pre["sources"]) == {"source", "clean", "textbook"}
    (ctx.data / "textbook.jsonl.gz").unlink()  # stories: no textbook source, its weight is dropped
    assert set(recipe.pretrain_config(ctx)["phases"][1]["weights"]) == {"clean", "source"}


@pytest.mark.parametrize("smoke", [False, True])
def test_stage_configs_are_accepted_by_the_stages(tmp_path, smoke):
    """The pretrain/sft/dpo configs the recipe writes resolve in those stages' own config classes (catches a key a
    stage renamed or dropped)."""
    from phiforge.train.config import resolve_config
    from phiforge.train.dpo import DPOConfig
    from phiforge.train.pretrain import PretrainConfig, check_phases
    from phiforge.train.sft import SFTConfig

    cfg = recipe.merge(recipe.DEFAULTS, recipe.SMOKE) if smoke else recipe.DEFAULTS
    ctx = recipe.Ctx(cfg, tmp_path, verbose=False)
    pre = recipe.pretrain_config(ctx)
    got = resolve_config(PretrainConfig, recipe.write_yaml(tmp_path / "p.yaml", pre))
    assert got.max_steps == cfg["pretrain"]["max_steps"] and got.out == str(tmp_path / "pretrain")
    check_phases(got.phases, list(got.sources))
    for stage, cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        got = resolve_config(cls, recipe.write_yaml(tmp_path / f"{stage}.yaml", recipe.posttrain_config(ctx, stage)))
        assert got.seq_len == cfg[stage]["seq_len"] and got.model.endswith("final")


# ---------------------------------------------------------------------------------------------------------------
# corpus builders


def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_stdlib_corpus_is_deterministic_and_holds_out(tmp_path):
    kw = dict(budget_bytes=120_000, heldout_fraction=0.05, heldout_max=3, heldout_max_bytes=30_000, sft_max=100,
              seed=0, chunk_bytes=4000)
    info = recipe_data.build_stdlib(tmp_path / "a", **kw)
    recipe_data.build_stdlib(tmp_path / "b", **kw)
    for name in ("documents.jsonl.gz", "sft.jsonl", "dpo.jsonl", "heldout_sft.jsonl", "heldout.txt",
                 "tokenizer_corpus.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    docs = _read_gz(tmp_path / "a/documents.jsonl.gz")
    source = [d for d in docs if d["set"] == "source"]
    assert {d["set"] for d in docs} == {"source", "textbook"}
    assert info["source_docs"] == len(source) > 5 and info["source_bytes"] >= kw["budget_bytes"]
    assert all(0 <= d["doc_ratio"] <= 1 for d in source) and len({d["doc_ratio"] for d in source}) > 1
    assert len(source) > len({d["id"].split("#")[0] for d in source})  # files are cut into documents
    trained_files = {d["id"].split("#")[0] for d in docs}
    held = json.loads((tmp_path / "a/heldout_index.json").read_text())
    assert held and not set(held) & trained_files
    sft = [json.loads(ln) for ln in (tmp_path / "a/sft.jsonl").read_text().splitlines()]
    assert len(sft) == 100 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    dpo = [json.loads(ln) for ln in (tmp_path / "a/dpo.jsonl").read_text().splitlines()]
    assert dpo and all(r["chosen"] != r["rejected"] and r["prompt"].startswith("What does") for r in dpo)
    assert all(sorted(r["rejected"].split()) == sorted(r["chosen"].split()) for r in dpo)  # same words, shuffled
    # the held-out questions are about held-out files, never asked in training
    asked = {r["messages"][0]["content"] for r in sft}
    heldout_qa = [json.loads(ln) for ln in (tmp_path / "a/heldout_sft.jsonl").read_text().splitlines()]
    assert heldout_qa and not {r["messages"][0]["content"] for r in heldout_qa} & asked


def test_stdlib_facts_come_from_docstrings():
    src = 'def dedent(text):\n    """Remove any common leading whitespace from every line.\n\n    More."""\n    return text\n'
    info = recipe_data.analyse(src, "textwrap")
    assert info["facts"] == [{"name": "textwrap.dedent", "summary": "Remove any common leading whitespace from every "
                              "line.", "signature": "def dedent(text):"}]
    assert "## textwrap.dedent" in info["chapter"] and '"""' not in info["chapter"]
    assert recipe_data.doc_ratio(info) == 0.5  # the function has a docstring, the module does not


def test_story_corpus(tmp_path):
    story = "Once upon a time there was a cat named {}. It liked milk. It played all day in the sun. " \
            "Then it went home and slept. The end came soon for the long day."
    (tmp_path / "s.txt").write_text("\n<|endoftext|>\n".join(story.format(i) for i in range(300)))
    info = recipe_data.build_stories([str(tmp_path / "s.txt")], tmp_path / "out", 10**9, 0.05, 5, 50, 0)
    assert info["heldout_docs"] == 5 and info["source_docs"] + info["heldout_docs"] <= 300
    sft = [json.loads(ln) for ln in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    assert len(sft) == 50 and sft[0]["messages"][0]["content"].startswith("Continue this story:")
    with pytest.raises(UserError):
        recipe_data.build_stories([str(tmp_path / "missing")], tmp_path / "x", 10**9, 0.05, 5, 50, 0)


# ---------------------------------------------------------------------------------------------------------------
# end to end (--smoke)


def test_smoke_recipe_end_to_end(smoke_run):
    out, r, seconds = smoke_run
    assert seconds < SMOKE_LIMIT_S
    assert r.stdout.strip().splitlines()[-1] == f"chat with it: phiforge chat {out / 'final'}"
    for name, _ in recipe.STAGES:
        assert (out / ".recipe" / f"{name}.json").exists(), name
    m = json.loads((out / "report.json").read_text())["metrics"]
    # loss curves fall
    assert m["pretrain"]["loss_last10"] < m["pretrain"]["loss_first"] - 0.3
    assert m["pretrain"]["phases"] == {"phase1": 18, "phase2": 12}
    assert any(k.startswith("val/") for k in m["pretrain"])
    assert m["sft"]["loss_last"] < m["sft"]["loss_first"]
    # the evaluation table is filled: every model scored, SFT and DPO evaluations present
    assert set(m["perplexity"]) == {"pretrain", "sft", "dpo (final)", "final int8", "final int4"}
    for label, v in m["perplexity"].items():
        assert 0 < v["bits_per_byte"] < 12, label
    for q in ("final int8", "final int4"):  # quantization cost, measured against the fp32 final model
        assert m["perplexity"][q]["kl"] >= 0 and 0 < m["perplexity"][q]["top1_agree"] <= 1
    assert m["perplexity"]["final int8"]["kl"] < m["perplexity"]["final int4"]["kl"]
    assert 0 <= m["sft"]["end_rate"] <= 1 and m["sft"]["n"] > 0
    assert 0 <= m["dpo"]["val_rewards/accuracies"] <= 1
    # int8 stays close to fp32; int4 is no better than int8 by more than noise
    bpb = {k: v["bits_per_byte"] for k, v in m["perplexity"].items()}
    assert abs(bpb["final int8"] - bpb["dpo (final)"]) < 0.05 * bpb["dpo (final)"]
    report = (out / "report.md").read_text()
    assert "| held-out bits per byte" in report and report.rstrip().endswith(f"phiforge chat {out / 'final'}")
    for png in ("loss_curves.png", "eval_table.png", "ppl_vs_bits.png"):
        assert (out / "report" / png).stat().st_size > 10_000, png
    # the final model loads and carries the chat format
    from phiforge import load
    model, tok = load(str(out / "final"))
    assert tok.token_to_id("<|end|>") is not None


def test_rerun_skips_every_stage(smoke_run):
    out, _, _ = smoke_run
    before = (out / "report.json").read_text()
    r = run_recipe(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("skipped: done earlier") == len(recipe.STAGES)
    assert (out / "report.json").read_text() == before


def test_rerun_with_another_recipe_is_refused(smoke_run):
    out, _, _ = smoke_run
    r = run_recipe(out, "--set", "pretrain.max_steps=31")
    assert r.returncode == 2 and "different recipe" in r.stderr


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_killed_run_resumes_to_the_same_report(smoke_run, tmp_path, stage):
    """SIGKILL the recipe once `stage` has written a checkpoint (mid-stage), rerun: same report, same numbers."""
    ref_out, _, _ = smoke_run
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "phiforge.cli", "recipe", "--smoke", "--quiet", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + SMOKE_LIMIT_S
    try:
        while not list((out / stage / "ckpt").glob("step_*")):
            assert proc.poll() is None, "the recipe ended before the stage wrote a checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / ".recipe" / f"{stage}.json").exists(), "killed too late: the stage had finished"
    r = run_recipe(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["metrics"] == \
        json.loads((ref_out / "report.json").read_text())["metrics"]
    assert report_without_timings(out).replace(str(out), "OUT") == \
        report_without_timings(ref_out).replace(str(ref_out), "OUT")


def test_story_recipe_data_stages(tmp_path):
    """--data: the story corpus goes through `phiforge data decontam/filter/dedup`, the tokenizer and tokenize."""
    import random
    rng = random.Random(0)
    words = ("the dog cat sun ball tree park happy little big red went played with and to of that have be home "
             "mom dad friend garden bird flew jumped ran smiled laughed found ate cake water sky blue green").split()
    stories = [" ".join(" ".join(rng.choice(words) for _ in range(9)).capitalize() + "." for _ in range(6))
               for _ in range(120)]
    data = tmp_path / "stories.txt"
    data.write_text("\n<|endoftext|>\n".join(stories + [stories[0]]))  # an exact duplicate for dedup to find
    out = tmp_path / "run"
    r = run_recipe(out, "--data", str(data), "--until", "tokenize", "--set", "eval.data_dir=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped after tokenize" in r.stderr and not (out / ".recipe" / "pretrain.json").exists()
    assert json.loads((out / "data/filtered/stats.json").read_text())["docs_in"] > 100
    assert json.loads((out / "data/clean/clusters.json").read_text())["removed"] >= 1
    assert set(p.name for p in (out / "tokens").iterdir()) == {"source", "clean"}  # no textbook for stories
    assert json.loads((out / "tokens/clean/meta.json").read_text())["complete"]
