"""Issue 34, the newcomer's path: what a new user runs after the README (generation capped at the context, mistyped
paths, help examples that work, perplexity feedback, broken weights, Ctrl-C in pretrain, the server's bad bodies)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.utils import UserError
from tests.conftest import SAMPLE_TEXT
from tests.test_cli_errors import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args, stdin: str | None = None, cwd=ROOT, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "phiforge.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=cwd)




@pytest.fixture(scope="module")
def model_dir(trained_tokenizer, tmp_path_factory):
    """The tiny preset (a context of 256 positions) with the trained tokenizer."""
    model, _ = load("tiny", seed=0)
    cfg = model.config
    assert cfg.max_position_embeddings == 256
    return save_hf_folder(model, tmp_path_factory.mktemp("m") / "m", trained_tokenizer)


# ------------------------------------------------------------------------------------------------------------------
# 1. generation is capped at the context with a notice, in generate, chat and the server


def test_generate_caps_max_new_tokens_at_the_context(model_dir):
    proc = run_cli("generate", model_dir, "--prompt", "Once upon a time", "--max-new-tokens", "100000",
                   "--stop", "@@never@@", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "notice: --max-new-tokens 100000 capped at" in proc.stderr and "context of 256" in proc.stderr
    n = int(re.search(r"\[(\d+) tokens", proc.stderr).group(1))
    assert n <= 256


def test_chat_default_fits_a_small_context_and_a_large_request_is_capped(model_dir):
    # the default used to be 512 new tokens: every message on a 256- or 512-context model was refused
    proc = subprocess.run([sys.executable, "-m", "phiforge.chat", str(model_dir)], input="hi\n/exit\n",
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "does not fit" not in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "phiforge.chat", str(model_dir), "--max-new-tokens", "1000"],
                          input="hi\n/exit\n", capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "does not fit" not in proc.stdout and "[answer capped at" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def server(model_dir):
    from phiforge.serve import start_background

    url, stop = start_background(load(str(model_dir)), model_id="tiny", max_batch=4)
    yield url
    stop()


def test_server_caps_max_tokens_with_a_notice(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 10 ** 9, "temperature": 0,
                                                     "stop": ["@@never@@"]}, timeout=120)
    assert r.status_code == 200, r.text
    assert "capped at" in r.headers["x-phiforge-notice"]
    body = r.json()
    assert body["usage"]["total_tokens"] <= 256
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 100000, "stream": True}, timeout=120)
    assert r.status_code == 200 and "capped at" in r.headers["x-phiforge-notice"]
    assert r.text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------------------------------------------------------
# 7. a mistyped local path is not looked up on the Hub


def test_mistyped_local_path_says_it_does_not_exist(model_dir, tmp_path):
    (tmp_path / "runs" / "default").mkdir(parents=True)
    proc = run_cli("generate", "runs/defualt", "--prompt", "x", cwd=tmp_path)
    assert_one_line_error(proc, "'runs/defualt' does not exist", "did you mean runs/default?")
    assert "Hub" not in proc.stderr and "LocalEntryNotFound" not in proc.stderr
    # from a folder without runs/, `runs/defualt` is also a valid Hub id: the one line says both readings
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "phiforge.cli", "generate", "runs/defualt", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120, cwd=elsewhere,
                          env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "'runs/defualt' is not a local folder", str(elsewhere), "Hugging Face Hub")


# ------------------------------------------------------------------------------------------------------------------
# 8. help examples and README commands that work


def test_eval_repeated_tasks_all_run_and_text_files_need_no_data_dir(model_dir, tmp_path, monkeypatch):
    from phiforge.eval import harness

    monkeypatch.setattr(harness, "shared_dir", lambda: None)  # as on a fresh clone without ../shared
    (tmp_path / "notes.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "r.json"
    harness.main([str(model_dir), "--tasks", "perplexity", "--text-files", str(tmp_path / "notes.txt"),
                  "--tasks", "passkey", "--context-lengths", "120", "--out", str(out)])
    assert set(json.loads(out.read_text())["results"]) == {"perplexity", "passkey"}
    assert "--tasks passkey" not in harness.__doc__  # the help example names each flag once


def test_readme_data_stages_and_help_recipes_exist():
    from phiforge.data.cli import STAGES

    readme = (ROOT / "README.md").read_text()
    row = re.search(r"`phiforge data ([^`]+)`", readme).group(1)
    for stage in row.replace("\\|", "|").split("|"):
        assert stage in STAGES, f"README names data stage {stage!r}"
    texts = [p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("phiforge/**/*.py")]]
    for name in sorted({m for t in texts for m in re.findall(r"\brecipes/[\w.-]+\.yaml\b", t)}):
        assert (ROOT / name).exists(), f"{name} is named in the docs or a --help but does not exist"


# ------------------------------------------------------------------------------------------------------------------
# 9. perplexity: progress, --max-tokens reads a prefix, binary input, the reference's own perplexity


def test_perplexity_binary_file_is_one_line(model_dir, tmp_path):
    blob = tmp_path / "weights.txt"
    blob.write_bytes(bytes(range(256)) * 4000)
    assert_one_line_error(run_cli("perplexity", model_dir, "--data", blob), "binary")


def test_perplexity_max_tokens_encodes_only_a_prefix(model_dir, tmp_path):
    from phiforge.perplexity import encode_prefix

    _, tok = load(str(model_dir))
    big = tmp_path / "big.txt"
    big.write_text(SAMPLE_TEXT * 4000)  # ~1 MB
    seen = []
    encode = tok.encode
    tok.encode = lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    ids, nbytes = encode_prefix(tok, str(big), 100)
    assert max(seen) < 20_000 and nbytes is None  # read a prefix, not the megabyte
    assert ids == encode(big.read_text(), add_special_tokens=True)[:101]
    small = tmp_path / "small.txt"
    small.write_text("Tom and Lily.")
    ids, nbytes = encode_prefix(tok, str(small), 100)
    assert ids == encode("Tom and Lily.", add_special_tokens=True) and nbytes == len("Tom and Lily.")


def test_perplexity_reference_prints_its_own_perplexity_and_change_and_shows_progress(model_dir, tmp_path,
                                                                                         capsys):
    from phiforge.perplexity import main

    other = save_hf_folder(load("tiny", seed=1)[0], tmp_path / "other", load(str(model_dir))[1])
    (tmp_path / "d.txt").write_text(SAMPLE_TEXT * 4)
    assert main([str(other), "--data", str(tmp_path / "d.txt"), "--reference", str(model_dir), "--ctx", "32",
                 "--json", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    res = json.loads((tmp_path / "r.json").read_text())
    want = 100 * (res["ppl"] / res["ref_ppl"] - 1)
    assert f"reference perplexity {res['ref_ppl']:.4f} (model {want:+.2f}%)" in out
    ref_alone = main([str(model_dir), "--data", str(tmp_path / "d.txt"), "--ctx", "32"])
    assert ref_alone == 0 and f"perplexity {res['ref_ppl']:.4f}" in capsys.readouterr().out
    assert "perplexity" in err and "tok" in err  # the progress bar, on stderr


# ------------------------------------------------------------------------------------------------------------------
# 10. NaN weights, Ctrl-C in pretrain, tokenizer on jsonl, --system, --compile's tokens/s


def test_nan_weights_are_refused_naming_the_tensor(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds NaN"):
        load(str(bad))
    assert_one_line_error(run_cli("generate", bad, "--prompt", "x"), "down_proj.weight holds NaN")


def test_tokenizer_trains_on_the_text_field_of_jsonl(tmp_path):
    from phiforge.tokenizer import Tokenizer
    from phiforge.tokenizer import main as tok_main

    lines = [json.dumps({"text": f"Tom and Lily went to the park number {i}.", "id": i}) for i in range(300)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    tok_main(["--files", str(tmp_path / "x.jsonl"), "--vocab-size", "400", "--out", str(tmp_path / "tok")])
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any('"text' in piece or '{"' in piece or "id" == piece.strip('":, ') for piece in vocab), \
        [p for p in vocab if '"' in p][:10]
    assert len(Tokenizer.from_folder(tmp_path / "tok").encode("Tom and Lily went to the park")) < 12


def test_system_implies_chat(model_dir):
    a = run_cli("generate", model_dir, "--prompt", "hi", "--system", "Be brief.", "--max-new-tokens", "12")
    b = run_cli("generate", model_dir, "--prompt", "hi", "--system", "Be brief.", "--chat", "--max-new-tokens", "12")
    c = run_cli("generate", model_dir, "--prompt", "hi", "--max-new-tokens", "12")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert a.stdout == b.stdout
    assert "prompt 2 tokens" not in a.stderr and a.stderr.split("prompt ")[-1] == b.stderr.split("prompt ")[-1]
    assert a.stderr.split("prompt ")[-1] != c.stderr.split("prompt ")[-1]  # the template made a longer prompt


def test_prompt_from_stdin_and_file(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Once upon a time")
    a = run_cli("generate", model_dir, "--prompt", "Once upon a time", "--max-new-tokens", "8")
    b = run_cli("generate", model_dir, "--prompt", "-", "--max-new-tokens", "8", stdin="Once upon a time")
    c = run_cli("generate", model_dir, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "8")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert a.stdout == b.stdout == c.stdout
    assert_one_line_error(run_cli("generate", model_dir, "--prompt-file", tmp_path / "nope.txt"), "nope.txt")


def test_compiled_decode_rate_leaves_out_the_compiling_step(model_dir, monkeypatch):
    """`generate --compile`: the first decode call compiles (seconds to minutes); tokens/s must time the steps after
    it. A stand-in 'compiled' model sleeps on its first call."""
    from phiforge import generate as gen

    model, tok = load(str(model_dir))
    calls = []

    def fake_compiled(m):
        def run(*a, **kw):
            if not calls:
                time.sleep(1.0)
            calls.append(1)
            return m(*a, **kw)
        return run

    monkeypatch.setattr(gen, "compiled", fake_compiled)
    r = gen.generate(model, tok, "Once upon a time", max_new_tokens=30, stop_ids=(), compile=True)
    assert len(r.token_ids) == 30
    with_compile = 29 / 1.0  # at most, counting the 1 s step
    assert r.decode_tokens_per_s > 3 * with_compile, r.decode_tokens_per_s


def test_ctrl_c_in_pretrain_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    from phiforge.tokenizer import train_bpe
    from phiforge.train import tokenize
    from phiforge.train.state import latest_checkpoint, read_checkpoint_state
    from tests.test_tokenize import make_stories
    from tests.test_train import tiny_args  # the same tiny run the training tests use

    train_bpe(make_stories(100, seed=1), vocab_size=300).save(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(make_stories(100, seed=2)))
    tokenize.main([str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "a"),
                   "--workers", "1", "--val-fraction", "0.1"])
    run = tmp_path / "run"
    args = tiny_args(tmp_path, run, max_steps=100000, ckpt_every=100000, eval_every=100000, log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "phiforge.cli", "pretrain", *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err and "saved a checkpoint at step" in err
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and read_checkpoint_state(ckpt)["step"] >= 2
    resume = err.split("Continue with:\n")[1].strip()
    assert resume.startswith("phiforge pretrain ") and resume.endswith(" --resume")


# ------------------------------------------------------------------------------------------------------------------
# 11. the server: a deeply nested body is a 400


def test_deeply_nested_json_is_a_400(server):
    for body in (b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 100000, b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}"):
        r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code in (400, 422), (r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    assert httpx.get(server + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------------------------
# What users of llama.cpp, Ollama and litgpt reach for


def test_version_and_did_you_mean_for_commands_and_data_stages():
    from phiforge import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"phiforge {__version__}"
    proc = run_cli("genrate")
    assert proc.returncode == 2 and "did you mean generate?" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert_one_line_error(run_cli("data", "classify"), "did you mean train-classifier or score?")
    assert_one_line_error(run_cli("data", "dedupe"), "did you mean dedup?")


def test_chat_reads_multi_line_messages():
    from phiforge.chat import ChatSession, repl

    class Recorder(ChatSession):
        def __init__(self):
            self.got = []

        def answer(self, user_text, out=sys.stdout):
            self.got.append(user_text)
            return "", "stop"

    import io
    session = Recorder()
    stdin = io.StringIO('first line \\\nsecond line\n"""\ncode:\n\n  x = 1\n"""\nplain\n/exit\n')
    assert repl(session, stdin=stdin, out=io.StringIO()) == 0
    assert session.got == ["first line \nsecond line", "code:\n\n  x = 1", "plain"]


def test_request_log_line_and_prometheus_metrics(model_dir, capfd):
    from phiforge.serve import start_background

    url, stop = start_background(load(str(model_dir)), model_id="tiny", access_log=True)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Tom", "max_tokens": 5, "temperature": 0,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200
        assert httpx.post(url + "/v1/completions", content=b"{", timeout=60).status_code == 400
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                "ignore_eos": True}) as s:
            assert s.status_code == 200 and s.read().endswith(b"data: [DONE]\n\n")
        m = httpx.get(url + "/metrics", timeout=10)
    finally:
        stop()
    err = capfd.readouterr().err
    assert re.search(r"POST /v1/completions 200 tokens=5 \d+ms", err), err
    assert re.search(r"POST /v1/completions 400 tokens=- \d+ms", err), err
    assert re.search(r"POST /v1/chat/completions 200 tokens=3 \d+ms", err), err
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'phiforge_requests_total{method="POST",path="/v1/completions",status="200"} 1' in text
    assert 'phiforge_requests_total{method="POST",path="/v1/completions",status="400"} 1' in text
    assert "phiforge_generated_tokens_total 8" in text and "# TYPE phiforge_running gauge" in text


def test_mistyped_flag_suggests_the_option_and_help_shows_defaults():
    proc = run_cli("perplexity", "m", "--data", "x", "--max-tokenz", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "did you mean --max-tokens?" in proc.stderr
    from phiforge.cli import COMMANDS

    for name in ("generate", "chat", "serve", "perplexity", "quantize", "eval"):
        out = run_cli(name, "--help").stdout
        assert "(default: " in out, name
    assert "--top-p TOP_P         (default: 1.0)" in run_cli("generate", "--help").stdout
    assert set(COMMANDS) >= {"generate", "chat", "serve", "perplexity", "quantize", "eval"}
