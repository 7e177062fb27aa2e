"""Annotation and synthesis against a real HTTP server speaking the OpenAI protocol on loopback (tests/openai_stub.py):
timeouts, 429/500 retries, the response cache, and a synthesis run killed and resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_stub import OpenAIStub  # noqa: E402

from phiforge.data import annotate, synth  # noqa: E402
from phiforge.client import ChatClient, RequestFailed  # noqa: E402
from phiforge.data.io import read_jsonl  # noqa: E402
from phiforge.utils import UserError  # noqa: E402

os.environ["PHIFORGE_NO_PROGRESS"] = "1"
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--backoff", "0.01", "--max-retries", "4"]


def docs_file(tmp: Path) -> Path:
    texts = ["Photosynthesis lets plants turn light into sugar; here is how it works.",
             "Best casino bonus codes, win big now!!!",
             "A short note about the weather in town today.",
             "Photosynthesis again, with a worked example for students."]
    p = tmp / "docs.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return p


def read_all(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("*.jsonl.gz")) for r in read_jsonl(f)]


def test_client_retries_429_500_and_timeouts_then_caches(tmp_path):
    with OpenAIStub() as stub:
        stub.faults = ["429", "500", "delay:1.0"]
        c = ChatClient(stub.url, "stub", timeout=0.3, max_retries=4, backoff=0.01, cache=tmp_path / "c.jsonl")
        reply = c.complete("Write a story with the noun \"kite\".")
        assert "kite" in reply
        assert stub.requests == 4 and c.stats["retries"] == 3 and c.stats["timeouts"] == 1
        c.close()
        c2 = ChatClient(stub.url, "stub", cache=tmp_path / "c.jsonl")  # a new process: answered from the cache
        assert c2.complete("Write a story with the noun \"kite\".") == reply and stub.requests == 4
        stub.faults = ["500"] * 10
        c3 = ChatClient(stub.url, "stub", max_retries=2, backoff=0.01)
        with pytest.raises(RequestFailed, match="gave up after 3 attempts"):
            c3.complete("another prompt")
        with pytest.raises(UserError, match="base-url"):
            ChatClient("127.0.0.1:1", "stub")


def test_annotate_with_faults_and_sampling(tmp_path):
    inp = docs_file(tmp_path)
    out = tmp_path / "labels"
    with OpenAIStub() as stub:
        stub.faults = ["429", "500", "429"]
        annotate.main([str(inp), "--out", str(out), "--base-url", stub.url, "--concurrency", "3", *FAST])
        labels = {r["id"]: r["score"] for r in read_all(out)}
        assert labels == {"d0": 5, "d1": 1, "d2": 3, "d3": 5}
        assert stub.requests == 4 + 3  # every fault retried once
        st = json.loads((out / "stats.json").read_text())
        assert st["hist"]["edu_score"]["counts"] == [0, 1, 0, 1, 0, 2]
        # the labels feed the classifier stage directly (the hidden response cache beside them is not read)
        from phiforge.data import classify

        assert classify.train_main([str(out), "--out", str(tmp_path / "clf")]) == 0
        assert classify.load_model(tmp_path / "clf").predict_proba(classify.Features.build(["x"])).shape == (1,)
        # a sample: the same documents whatever the sharding
        sample = ["--base-url", stub.url, "--sample", "0.5", "--seed", "3"]
        annotate.main([str(inp), "--out", str(tmp_path / "s1"), *sample])
        annotate.main([str(inp), "--out", str(tmp_path / "s2"), *sample, "--shard-size", "1"])
        assert [r["id"] for r in read_all(tmp_path / "s1")] == [r["id"] for r in read_all(tmp_path / "s2")]


def test_annotate_server_down_is_an_error_and_rerun_resumes(tmp_path):
    inp = docs_file(tmp_path)
    out = tmp_path / "labels"
    with OpenAIStub() as stub:
        stub.faults = [None, None] + ["500"] * 20  # two answers, then the server breaks
        with pytest.raises(UserError, match="rerun the same command"):
            annotate.main([str(inp), "--out", str(out), "--base-url", stub.url, "--concurrency", "1",
                           "--backoff", "0.001", "--max-retries", "1"])
        assert not (out / "stats.json").exists()
        stub.faults = []
        before = stub.requests
        annotate.main([str(inp), "--out", str(out), "--base-url", stub.url, "--concurrency", "1"])
        assert stub.requests - before == 2  # the two answered documents came from the cache
        assert len(read_all(out)) == 4


def test_synth_prompts_are_seeded_and_use_the_word_lists():
    table, template = synth.load_recipe("tinystories", None, None)
    p1, m1 = synth.make_prompt("tinystories", table, template, 0, 7)
    assert (p1, m1) == synth.make_prompt("tinystories", table, template, 0, 7)
    assert p1 != synth.make_prompt("tinystories", table, template, 1, 7)[0]
    assert m1["noun"] in table["nouns"] and m1["verb"] in table["verbs"] and m1["adjective"] in table["adjectives"]
    assert f'"{m1["noun"]}"' in p1 and "{" not in p1
    prompts = {synth.make_prompt("tinystories", table, template, 0, i)[0] for i in range(200)}
    assert len(prompts) == 200  # combinations, not a handful of templates
    tb, tt = synth.load_recipe("textbook", None, None)
    p, m = synth.make_prompt("textbook", tb, tt, 0, 3)
    assert m["topic"] in p and m["audience"] in p and "{" not in p


def test_synth_killed_and_resumed_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "stories"
    n, shard = 24, 4
    with OpenAIStub(delay=0.05) as stub:
        cmd = [sys.executable, "-m", "phiforge.data.cli", "synth", "--recipe", "tinystories", "--n", str(n), "--out",
               str(out), "--shard-size", str(shard), "--base-url", stub.url, "--concurrency", "2", "--seed", "5",
               "--min-words", "20"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while len(list((out / ".done").glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(list((out / ".done").glob("*.json")))
    assert 2 <= done_before < n // shard, "the run should be killed part-way"
    # Resume against a fresh endpoint (the cache key is the request body, not the URL), so a request the killed
    # process sent just before SIGKILL, still being counted by the first server, cannot be mistaken for a redo.
    with OpenAIStub(delay=0.05) as stub_resume:
        cmd[cmd.index(stub.url)] = stub_resume.url
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        redone = stub_resume.requests
    assert 0 < redone <= n - done_before * shard  # finished units and cached answers are not asked again
    docs = read_all(out)
    ids = [d["id"] for d in docs]
    assert ids == [f"tinystories-5-{i}" for i in range(n)]  # nothing lost, nothing duplicated, in order
    st = json.loads((out / "stats.json").read_text())
    assert st["docs_in"] == n and st["docs_out"] == n
    assert all(d["noun"] in d["text"] for d in docs)  # the teacher saw the prompt built from the word lists
    # a second run with everything done asks nothing and changes nothing
    with OpenAIStub() as stub2:
        synth.main(["--recipe", "tinystories", "--n", str(n), "--out", str(out), "--shard-size", str(shard),
                    "--base-url", stub2.url, "--seed", "5"])
        assert stub2.requests == 0


def test_synth_filters_and_dedups_replies(tmp_path):
    with OpenAIStub() as stub:
        synth.main(["--recipe", "textbook", "--n", "6", "--out", str(tmp_path / "tb"), "--base-url", stub.url,
                    "--min-words", "1000"])
    st = json.loads((tmp_path / "tb" / "stats.json").read_text())
    assert st["removed"] == {"too_short": 6} and st["docs_out"] == 0


def test_eval_backend_posts_through_the_same_retrying_client():
    """The eval model/judge backend (OpenAILM) shares phiforge.client: 429/500 are retried, a 4xx is not."""
    from phiforge.eval.openai_backend import OpenAILM

    with OpenAIStub() as stub:
        lm = OpenAILM(stub.url, retries=3)
        assert lm.model == "stub"  # from GET /models
        stub.faults = ["429", "500"]
        before = stub.requests
        assert "kite" in lm.chat([{"role": "user", "content": "Write a story with the noun \"kite\"."}])
        assert stub.requests - before == 3
        before = stub.requests
        with pytest.raises(UserError, match="404"):
            lm.post("/nowhere", {"messages": [{"role": "user", "content": "hi"}]})
        assert stub.requests - before == 1
        stub.faults = ["500"] * 5
        with pytest.raises(UserError, match="gave up after 3 attempts"):
            lm.chat([{"role": "user", "content": "again"}])
