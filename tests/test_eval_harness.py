"""phiforge eval: the fast log-likelihood engine against a naive forward, metrics, error messages, outputs,
determinism, generative scoring, perplexity windows, passkey, and the OpenAI-compatible model / MT-bench judge
paths against a fake server. Tiny model: phiforge's `tiny` preset with a BPE tokenizer trained here."""
from __future__ import annotations

import gzip
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from phiforge.utils import UserError, shared_dir

ASSETS = Path(__file__).parent / "assets" / "eval"


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from phiforge.checkpoint import build_model, save_hf_folder
    from phiforge.models import config_from_name
    from phiforge.models.phi3 import Phi3Config
    from phiforge.tokenizer import train_bpe

    texts = [line for f in ASSETS.glob("data/**/*.jsonl") for line in f.read_text().splitlines()] * 3
    tok = train_bpe(texts, vocab_size=420)
    cfg = config_from_name("tiny", max_position_embeddings=1024, original_max_position_embeddings=1024)
    torch.manual_seed(0)
    model = build_model(cfg, init=False)
    model.init_weights(seed=0)
    with torch.no_grad():  # larger weights than init so choices score clearly apart
        for p in model.parameters():
            p.mul_(3.0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_folder(model, folder, tokenizer=tok)
    return folder


@pytest.fixture(scope="module")
def lm(tiny_dir):
    from phiforge import load
    from phiforge.eval.lm import LocalLM

    model, tok = load(str(tiny_dir))
    return LocalLM(model, tok, batch_size=3, min_shared_prefix=4)


@pytest.fixture
def data_dir(tmp_path):
    """The hermetic fixture data (tests/assets/eval/data) plus a gzipped HumanEval with two problems."""
    d = tmp_path / "data"
    shutil.copytree(ASSETS / "data", d)
    (d / "humaneval").mkdir()
    with gzip.open(d / "humaneval/HumanEval.jsonl.gz", "wt") as f:
        f.write((ASSETS / "humaneval_2.jsonl").read_text())
    return d


def run_eval(args: list[str]) -> int:
    from phiforge.eval.harness import main
    return main(args)


# -- the log-likelihood engine ----------------------------------------------------------------------------------
@torch.no_grad()
def naive_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's HFLM arithmetic, one full forward per request, no sharing (lm_eval/models/huggingface.py)."""
    ctx, cont = lm.encode_pair(context, continuation)
    inp = torch.tensor([(ctx + cont)[-(lm.max_length + 1):][:-1]])
    logp = torch.log_softmax(lm.model(inp).float(), dim=-1)[0, -len(cont):]
    cont_t = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), cont_t].sum()), bool((logp.argmax(-1) == cont_t).all())


def test_fast_loglikelihood_equals_naive_forward(lm):
    shared = "The following are questions about the sky and the sea. " * 3
    pairs = [(shared + "Q: what is blue?\nAnswer:", " A"), (shared + "Q: what is blue?\nAnswer:", " B"),
             (shared + "Q: what is wet?\nAnswer:", " the sea"), (shared + "Q: what is wet?\nAnswer: ", "the sky"),
             ("Tom and Lily", " went to the park."), ("Tom and Lily", " went"), ("", "Hello there"),
             (shared, " and more"), ("x" * 3000, " tail")]  # the last one is left-truncated to max_length
    fast = lm.loglikelihood(pairs, progress=False)
    for (c, x), (ll, greedy) in zip(pairs, fast):
        ref_ll, ref_greedy = naive_loglikelihood(lm, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy, (c[-30:], x)


def test_shared_prefix_cache_is_used_and_exact(lm, monkeypatch):
    from phiforge import scoring

    seen = []
    real = scoring._hidden
    monkeypatch.setattr(scoring, "_hidden", lambda model, seqs, p: seen.append(p) or real(model, seqs, p))
    shared = "Once upon a time there was a little robot named Pip who counted stars. " * 2
    pairs = [(shared + f"Question {i}:", f" answer {i}") for i in range(5)]
    fast = lm.loglikelihood(pairs, progress=False)
    assert max(seen) > 10  # the prefix went through the cache
    for (c, x), (ll, _) in zip(pairs, fast):
        assert ll == pytest.approx(naive_loglikelihood(lm, c, x)[0], abs=1e-4)


@torch.no_grad()
def test_greedy_generation_equals_argmax_loop_without_cache(lm):
    prompt = "Tom and Lily went to the"
    text = lm.generate(prompt, until=[], max_new_tokens=12)
    ids = list(lm.encode(prompt))
    for _ in range(12):
        nxt = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
        if nxt in lm.tok.stop_ids:
            break
        ids.append(nxt)
    assert text == lm.tok.decode(ids[len(lm.encode(prompt)):], skip_special_tokens=True)


def test_generation_stops_at_until_string(lm):
    full = lm.generate("Tom and Lily", until=[], max_new_tokens=20)
    if len(full) < 4:
        pytest.skip("tiny model stopped at once")
    stop = full[2:4]
    assert lm.generate("Tom and Lily", until=[stop], max_new_tokens=20) == full[:full.find(stop)]


@torch.no_grad()
def test_rolling_loglikelihood_matches_lm_eval_windows(lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "Tom and Lily went to the park. They saw a big red ball. " * 12
    old = lm.max_length
    lm.max_length = 16  # many windows, and a short last one
    try:
        total, n = lm.loglikelihood_rolling(text)
        toks = list(lm.tok.encode(text))
        ref = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(toks, lm.prefix_token_id, 16, 1)):
            inp = torch.tensor([(ctx + cont)[:-1]])
            logp = torch.log_softmax(lm.model(inp).float(), -1)[0, -len(cont):]
            ref += float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
    finally:
        lm.max_length = old
    assert n == len(toks) and total == pytest.approx(ref, abs=1e-3)


# -- metrics ----------------------------------------------------------------------------------------------------
def test_mc_scores_follow_lm_eval_definitions():
    from phiforge.eval.metrics import mc_scores, mean_stderr

    # acc picks the highest sum; acc_norm divides by the choice's length in characters
    s = mc_scores([-4.0, -6.0], [2, 6], gold=1)
    assert (s["acc"], s["acc_norm"]) == (0.0, 1.0)
    assert mc_scores([-1.0, -1.0], [1, 1], gold=1)["acc"] == 0.0  # ties go to the first choice (np.argmax)
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx((0.75 / 3) ** 0.5 / 2)  # sample std (ddof=1) / sqrt(n)


def test_pass_at_k():
    from phiforge.eval.metrics import pass_at_k

    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_gsm8k_strict_and_flexible_match():
    from phiforge.eval.tasks import gsm8k

    docs = [{"target": "18"}, {"target": "1000"}, {"target": "7"}]
    outs = [" She makes 9 * 2 = 18 dollars. The answer is 18.\n\n", " It costs $1,000 in total.", " The answer is 8."]
    rows = gsm8k.score(docs, outs)
    assert [r["exact_match_strict"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["exact_match_flexible"] for r in rows] == [1.0, 1.0, 0.0]


def test_gsm8k_prompt_is_lm_eval_cot_format(data_dir):
    from phiforge.eval.tasks import gsm8k

    d = gsm8k.load(data_dir, num_fewshot=8)[0]
    assert d["prompt"].startswith("Q: There are 15 trees in the grove.") and d["prompt"].endswith("\nA:")
    assert d["prompt"].count("The answer is") == 8 and d["prompt"].count("\n\nQ: ") == 8
    assert d["target"] == "18"


# -- errors -----------------------------------------------------------------------------------------------------
def test_unknown_task_names_it(tiny_dir, data_dir):
    from phiforge.cli import main as cli_main

    with pytest.raises(UserError, match="unknown task 'mmlu_pro'.*arc_easy"):
        run_eval([str(tiny_dir), "--tasks", "arc_easy,mmlu_pro", "--data-dir", str(data_dir)])
    assert cli_main(["eval", str(tiny_dir), "--tasks", "nope", "--data-dir", str(data_dir)]) == 2


def test_missing_data_file_names_it(tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"missing data file .*piqa/piqa_valid_llmfoundry\.jsonl"):
        run_eval([str(tiny_dir), "--tasks", "piqa", "--data-dir", str(tmp_path / "empty")])


@pytest.mark.parametrize("task,rel,content,pattern", [
    ("arc_easy", "arc/arc_easy_test_llmfoundry.jsonl",
     '{"query": "Question: a?", "choices": ["x", "y"], "gold": 0}\n{"query": "Question: b?", "choices": ["x"]}\n',
     r"malformed record .*arc_easy_test_llmfoundry\.jsonl line 2: missing field 'gold'"),
    ("arc_easy", "arc/arc_easy_test_llmfoundry.jsonl", '{"query": "Question: a?", "choices": ["x"], "gold": 3}\n',
     r"arc_easy_test_llmfoundry\.jsonl line 1: gold 3 is not an index"),
    ("piqa", "piqa/piqa_valid_llmfoundry.jsonl",
     '{"query": "Question: a?\\n", "choices": ["x", "y"], "gold": 0}\n{oops\n',
     r"piqa_valid_llmfoundry\.jsonl line 2: not JSON"),
    ("boolq", "boolq/boolq_val_llmfoundry.jsonl.gz", None,
     r"boolq_val_llmfoundry\.jsonl\.gz line 1: query should start"),
    ("mmlu", "mmlu/test/anatomy_test.csv", "What?,a,b,c,d,E\n", r"anatomy_test\.csv row 1"),
    ("gsm8k", "gsm8k/gsm8k_test.jsonl", '{"question": "q", "answer": "no number"}\n',
     r"gsm8k_test\.jsonl line 1: answer has no"),
])
def test_malformed_record_names_file_and_record(data_dir, task, rel, content, pattern):
    from phiforge.eval.harness import get_task

    p = data_dir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".gz"):
        with gzip.open(p, "wt") as f:
            f.write('{"query": "no passage prefix", "choices": ["no", "yes"], "gold": 1}\n')
    else:
        p.write_text(content)
    kwargs = {"subjects": ["anatomy"]} if task == "mmlu" else {}
    with pytest.raises(UserError, match=pattern):
        get_task(task).load(data_dir, num_fewshot=0, **kwargs)


# -- end to end ----------------------------------------------------------------------------------------------------
def test_outputs_are_written_and_runs_are_deterministic(tiny_dir, data_dir, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}" / "results.json"
        assert run_eval([str(tiny_dir), "--tasks", "arc_easy,gsm8k,humaneval", "--data-dir", str(data_dir),
                         "--num-fewshot", "0", "--max-gen-toks", "12", "--out", str(out)]) == 0
        res = json.loads(out.read_text())["results"]
        samples = out.with_suffix(".samples.jsonl").read_text()
        table = out.with_suffix(".md").read_text()
        for r in res.values():
            r.pop("seconds")
        outs.append((res, samples, table))
    assert outs[0] == outs[1]
    res, samples, table = outs[0]
    assert res["arc_easy"]["n"] == 4 and 0 <= res["arc_easy"]["acc"] <= 1 and "acc_norm_stderr" in res["arc_easy"]
    assert res["humaneval"]["n"] == 2 and "pass@1" in res["humaneval"] and "exact_match_strict" in res["gsm8k"]
    rows = [json.loads(line) for line in samples.splitlines()]
    assert {r["task"] for r in rows} == {"arc_easy", "gsm8k", "humaneval"}
    assert "| arc_easy | acc_norm |" in table


def test_humaneval_scoring_through_the_harness(data_dir):
    from phiforge.eval.tasks import humaneval

    docs = humaneval.load(data_dir)
    rows = humaneval.score(docs, [d["canonical_solution"] for d in docs])
    assert [r["pass@1"] for r in rows] == [1.0, 1.0]
    rows = humaneval.score(docs, ["    return None\n", "    while True:\n        pass\n"], timeout=1.0)
    assert [r["status"] for r in rows] == ["failed", "timeout"]


def test_perplexity_task_reports_bits_per_byte(tiny_dir, data_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Tom and Lily went to the park. They saw a big red ball.\n" * 4)
    out = tmp_path / "ppl.json"
    assert run_eval([str(tiny_dir), "--tasks", "perplexity", "--data-dir", str(data_dir), "--text-files", str(text),
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["perplexity"]
    row = json.loads(out.with_suffix(".samples.jsonl").read_text().splitlines()[0])
    nbytes = len(text.read_text().encode())
    assert r["bits_per_byte"] == pytest.approx(-row["logprob"] / nbytes / 0.6931471805599453)
    assert r["byte_perplexity"] == pytest.approx(2 ** r["bits_per_byte"])


def test_passkey_prompts_hit_the_requested_lengths(lm):
    from phiforge.eval.tasks import passkey

    docs = passkey.load(None, context_lengths="200,600", lm=lm)
    assert len(docs) == 2 * len(passkey.DEPTHS)
    for d in docs:
        n = lm.count_tokens(d["prompt"])
        assert d["context_length"] * 0.85 <= n <= d["context_length"] and d["key"] in d["prompt"]
    assert passkey.score(docs[:2], [f" {docs[0]['key']}.", " 12345"]) == [{"acc": 1.0}, {"acc": 0.0}]


# -- OpenAI-compatible endpoints (fake server) ------------------------------------------------------------------
class FakeOpenAI(BaseHTTPRequestHandler):
    """Completions: one token per character, logprob -0.5 each (echo+logprobs). Chat: a judge that rates
    single-turn prompts [[6]] and multi-turn ones [[8]]; a model that answers 'four'."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append((self.path, body))
        if self.path == "/v1/completions":
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = []
            for i, p in enumerate(prompts):
                if body.get("echo"):
                    lp = {"tokens": list(p), "token_logprobs": [None] + [-0.5] * (len(p) - 1),
                          "text_offset": list(range(len(p))), "top_logprobs": [None] + [{c: -0.5} for c in p[1:]]}
                    choices.append({"index": i, "text": p, "logprobs": lp})
                else:
                    choices.append({"index": i, "text": " The answer is 18.\n\nQ: next"})
            self._send({"choices": choices})
        elif self.path == "/v1/chat/completions":
            system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
            if system:
                multi = "<|The Start of Assistant A's Conversation with User|>" in body["messages"][1]["content"]
                text = "Good. Rating: [[8]]" if multi else "Fine. Rating: [[6]]"
            else:
                text = "four"
            self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        else:
            self.send_error(404)

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeOpenAI.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_model_url_runs_multiple_choice_and_generation(fake_server, data_dir, tmp_path):
    out = tmp_path / "api.json"
    assert run_eval([fake_server, "--model-name", "m", "--tasks", "arc_easy,gsm8k", "--data-dir", str(data_dir),
                     "--num-fewshot", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    for r in (r for r in rows if r["task"] == "arc_easy"):  # -0.5 per character of the continuation
        assert r["loglikelihoods"] == [-0.5 * len(c) for c in r["continuations"]]
    gen = [r for r in rows if r["task"] == "gsm8k"]
    assert [r["output"] for r in gen] == [" The answer is 18.\n\n"] * 2  # cut before "Q:"
    assert [r["exact_match_strict"] for r in gen] == [1.0, 0.0] and res["gsm8k"]["exact_match_strict"] == 0.5


@pytest.mark.skipif(shared_dir() is None, reason="needs ../shared/data/mt_bench (FastChat judge prompts)")
def test_mt_bench_two_turns_judged_with_fastchat_prompts(fake_server, lm):
    import argparse

    from phiforge.eval.tasks import mt_bench

    data = shared_dir() / "data"
    docs = mt_bench.load(data, judge_url=fake_server)
    picked = [next(d for d in docs if d["category"] == "writing"), next(d for d in docs if d["category"] == "math")]
    mt_bench.MAX_NEW_TOKENS = 6
    args = argparse.Namespace(judge_url=fake_server, judge_model="judge", judge_key_env="NO_SUCH_KEY",
                              data_dir=str(data))
    rows = mt_bench.run(lm, picked, args)
    agg = mt_bench.aggregate(rows)
    assert agg["score"] == pytest.approx(7.0) and agg["score_turn1"] == 6.0 and agg["score_turn2"] == 8.0
    judge_calls = [b for path, b in FakeOpenAI.requests if path == "/v1/chat/completions"]
    assert len(judge_calls) == 4 and all(b["temperature"] == 0.0 and b["model"] == "judge" for b in judge_calls)
    math_turn2 = judge_calls[3]["messages"][1]["content"]
    assert picked[1]["turns"][1] in math_turn2 and picked[1]["reference"][1] in math_turn2
    assert rows[1]["answers"][0] in math_turn2
    with pytest.raises(UserError, match="--judge-url"):
        mt_bench.load(data)


def test_judge_rating_parser():
    from phiforge.eval.tasks.mt_bench import parse_rating

    assert parse_rating("Rating: [[7.5]]") == 7.5 and parse_rating("I give [3]") == 3.0 and parse_rating("n/a") == -1.0


@pytest.mark.skipif(shared_dir() is None, reason="needs ../shared/data/wikitext")
def test_wikitext_is_one_lf_document():
    from phiforge.eval.tasks import wikitext

    docs = wikitext.load(shared_dir() / "data")
    assert len(docs) == 1 and "\r" not in docs[0]["text"] and len(docs[0]["text"]) > 1_000_000


def test_from_hub_converters_write_what_the_tasks_read(tmp_path, monkeypatch):
    """--from-hub offline: a fake `datasets.load_dataset` serves records in the Hub schemas; the written files
    must load into lm-eval's prompts (ARC, WinoGrande, HellaSwag, MMLU)."""
    import sys
    import types

    from phiforge.eval import hub
    from phiforge.eval.tasks import arc_easy, hellaswag, mmlu, winogrande

    hub_rows = {
        ("allenai/ai2_arc", "ARC-Easy"): [{"question": "Which is hot?", "answerKey": "2",
                                           "choices": {"text": ["ice", "fire"], "label": ["1", "2"]}}],
        ("allenai/winogrande", "winogrande_xl"): [{"sentence": "Tom gave Ann a gift because _ was kind.",
                                                   "option1": "Tom", "option2": "Ann", "answer": "1"}],
        ("Rowan/hellaswag", None): [{"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                                     "endings": ["bakes [title] bread.", "sings.", "runs.", "sleeps."], "label": "0"}],
        ("cais/mmlu", "anatomy"): [{"question": " What is the femur? ", "choices": ["bone", "organ", "cell", "nerve"],
                                    "answer": 0}],  # served for every subject
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: hub_rows[(name, "anatomy" if name == "cais/mmlu" else config)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for task in ("arc_easy", "winogrande", "hellaswag", "mmlu"):
        hub.fetch(task, tmp_path)
    d = arc_easy.load(tmp_path)[0]
    assert d["pairs"] == [("Question: Which is hot?\nAnswer:", " ice"), ("Question: Which is hot?\nAnswer:", " fire")]
    assert d["gold"] == 1
    d = winogrande.load(tmp_path)[0]
    assert d["pairs"] == [("Tom gave Ann a gift because Tom", " was kind."),
                          ("Tom gave Ann a gift because Ann", " was kind.")]
    assert d["gold"] == 0
    d = hellaswag.load(tmp_path)[0]  # lm-eval: preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())
    assert d["pairs"][0] == ("Baking: A man mixes flour. He", " bakes. bread.")
    d = mmlu.load(tmp_path, num_fewshot=1, subjects=["anatomy"])[0]
    assert d["pairs"][0][0].endswith("What is the femur?\nA. bone\nB. organ\nC. cell\nD. nerve\nAnswer:")



def test_phiforge_serve_url_gives_the_local_scores(tiny_dir, data_dir, tmp_path):
    """MODEL as a URL of `phiforge serve` (echo + logprobs, greedy completions) scores like the local folder."""
    from phiforge.serve import start_background

    common = ["--tasks", "arc_easy,gsm8k", "--data-dir", str(data_dir), "--num-fewshot", "0", "--max-gen-toks", "10"]
    url, stop = start_background(str(tiny_dir), max_batch=4, max_queue=16)
    try:
        assert run_eval([url + "/v1", *common, "--out", str(tmp_path / "api.json")]) == 0
    finally:
        stop()
    assert run_eval([str(tiny_dir), *common, "--out", str(tmp_path / "local.json")]) == 0
    api, local = ([json.loads(x) for x in (tmp_path / f"{n}.samples.jsonl").read_text().splitlines()]
                  for n in ("api", "local"))
    for a, b in zip(api, local):
        if a["task"] == "arc_easy":
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3) and a["acc"] == b["acc"]
        else:
            assert a["output"] == b["output"]


def test_longrope_sequences_are_scored_like_single_forwards(lm):
    """tiny-128k (LongRoPE, original context 32): short and long sequences in one call each get the factors a
    forward of that sequence alone would use (transformers' rule), including through the prefix cache."""
    from phiforge.checkpoint import build_model
    from phiforge.eval.lm import LocalLM
    from phiforge.models import config_from_name

    cfg = config_from_name("tiny-128k", vocab_size=lm.tok.vocab_size)
    model = build_model(cfg, init=False)
    model.init_weights(seed=1)
    long_lm = LocalLM(model, lm.tok, batch_size=4, min_shared_prefix=4)
    base = "Tom and Lily went to the park. "
    pairs = [(base, " They saw a ball."), (base * 2, " They saw a ball."), (base * 2, " They saw a cat."),
             (base * 6, " The end."), (base * 6, " The start.")]
    n_tokens = [len(long_lm.encode(c + x)) for c, x in pairs]
    assert min(n_tokens) < 32 < max(n_tokens)
    for (c, x), (ll, _) in zip(pairs, long_lm.loglikelihood(pairs, progress=False)):
        assert ll == pytest.approx(naive_loglikelihood(long_lm, c, x)[0], abs=1e-4)


@pytest.fixture(scope="module")
def bos_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a tokenizer whose tokenizer.json post-processor prepends <s> (as Phi-3's does)."""
    from conftest import with_bos_post_processor
    from phiforge.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_dir, folder)
    with_bos_post_processor(Tokenizer.from_folder(tiny_dir)).save(folder)
    return folder


@pytest.mark.parametrize("add_bos_token", [None, True, False])
@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
def test_tokens_rolling_and_generation_are_lm_evals(tiny_dir, bos_dir, bos, add_bos_token, monkeypatch):
    """lm-eval's HFLM on the same folder, with a tokenizer that adds nothing and one that prepends <s>, under its
    add_bos_token model argument (None / True / False) and ours: the same context/continuation tokens, log-likelihoods
    (empty context and trailing space included), rolling-window log-likelihood and greedy generate_until output."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from phiforge import load
    from phiforge.eval.lm import LocalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = str(bos_dir if bos else tiny_dir)
    ref = HFLM(pretrained=folder, dtype="float32", device="cpu", batch_size=2, max_length=32,
               add_bos_token=add_bos_token)
    model, tok = load(folder)
    ours = LocalLM(model, tok, batch_size=2, max_length=32, add_bos_token=add_bos_token)
    adds_bos = ref.tok_encode("Tom")[0] == ours.tok.bos_id
    assert adds_bos == (add_bos_token is True or (add_bos_token is None and bos))  # the case is what it says
    pairs = [("Tom and Lily went to the park.", " They saw a ball."), ("Question: what is red? ", "Answer: a ball"),
             ("", "Tom and Lily"), ("<s>The quick brown", " fox")]
    for text in [c + x for c, x in pairs]:
        assert list(ours.tok_encode(text)) == ref.tok_encode(text)
    for ctx, cont in pairs[:2] + pairs[3:]:
        assert tuple(map(list, ours.encode_pair(ctx, cont))) == ref._encode_pair(ctx, cont)
    got = ours.loglikelihood(pairs, progress=False)
    want = ref.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    text = "Tom and Lily went to the park. They saw a big red ball. " * 6  # several 32-token windows
    (want_rolling,) = ref.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert ours.loglikelihood_rolling(text)[0] == pytest.approx(want_rolling, abs=1e-4)
    prompts = ["Tom and Lily", "<s>The quick brown fox jumps over the lazy dog. The quick brown fox"]
    # one prompt per call: lm-eval decides a batch's special tokens by its first prompt alone
    want_gen = [ref.generate_until([Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 8,
                                                                        "do_sample": False}), 0)], disable_tqdm=True)[0]
                for p in prompts]
    assert ours.generate_many(prompts, ["\n\n"], 8, progress=False) == want_gen
