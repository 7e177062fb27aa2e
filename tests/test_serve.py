"""`phiforge serve` (issue 8): a real uvicorn server on 127.0.0.1 (free port, in-process thread) over a tiny model
whose tokenizer is trained in the test. The official `openai` client drives it; outputs are compared with the
engine (`phiforge generate` CLI, `phiforge.generate.generate`) and with a plain forward pass (logprobs).
References: OpenAI API reference (chat/completions, completions, streaming, error objects)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.generate import generate
from phiforge.sample import GenerationConfig
from phiforge.models.phi3 import Phi3Config
from phiforge.serve import start_background
from phiforge.tokenizer import SPECIAL_TOKENS
from phiforge.utils import UserError
from tests.conftest import wait_for

openai = pytest.importorskip("openai")
T = 60  # seconds: the bound of every request and wait loop in this file


@pytest.fixture(scope="module")
def server(served_model):
    _, _, folder = served_model
    url, stop = start_background(str(folder), max_batch=16, max_queue=16)
    yield url, stop
    stop()


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=T, **kw)


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=T).json()


def assert_no_special(text: str):
    assert not any(t in text for t in SPECIAL_TOKENS), f"special token leaked into {text!r}"


# ------------------------------------------------------------------------------------------------------------------
# Acceptance 1: the openai client; greedy outputs equal `phiforge generate`


def test_openai_client_chat_and_completions_equal_phiforge_generate(server, served_model, capsys):
    from phiforge.generate import main as generate_main

    url, _ = server
    _, tok, folder = served_model
    c = client(url)
    models = c.models.list().data
    assert [m.id for m in models] == [str(folder)]
    mid = models[0].id

    prompt, n = "Tom and Lily went to the park.", 40
    assert generate_main([str(folder), "--prompt", prompt, "--chat", "--max-new-tokens", str(n)]) == 0
    expected_chat = capsys.readouterr().out[:-1]  # the CLI ends with a newline
    msgs = [{"role": "user", "content": prompt}]
    r = c.chat.completions.create(model=mid, messages=msgs, temperature=0, max_tokens=n)
    assert r.choices[0].message.content == expected_chat
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= n

    stream = c.chat.completions.create(model=mid, messages=msgs, temperature=0, max_tokens=n, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected_chat
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    assert generate_main([str(folder), "--prompt", prompt, "--max-new-tokens", str(n)]) == 0
    expected = capsys.readouterr().out[:-1]
    r = c.completions.create(model=mid, prompt=prompt, temperature=0, max_tokens=n)
    assert r.choices[0].text == expected and r.object == "text_completion"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=mid, prompt=prompt, temperature=0, max_tokens=n, stream=True))
    assert streamed == expected

    # stop sequences: a piece of the greedy output ends it just before that piece (never printed)
    text = r.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    r2 = c.completions.create(model=mid, prompt=prompt, temperature=0, max_tokens=n, stop=[stop, "@@never@@"])
    assert r2.choices[0].text == text[:text.index(stop)] and r2.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model=mid, prompt=prompt, temperature=0, max_tokens=n, stop=stop,
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == r2.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sampling_parameters_equal_the_engine(server, served_model):
    """temperature, top_p, seed, presence/frequency penalties reach the engine's sampler unchanged."""
    url, _ = server
    model, tok, folder = served_model
    c = client(url)
    prompt = "Once upon a time"
    kw = dict(temperature=0.9, top_p=0.8, seed=7, presence_penalty=0.5, frequency_penalty=1.5)
    r = c.completions.create(model=str(folder), prompt=prompt, max_tokens=30, **kw)
    ref = generate(model, tok, tok.encode(prompt), GenerationConfig(max_new_tokens=30, **kw))
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    again = c.completions.create(model=str(folder), prompt=prompt, max_tokens=30, **kw)
    assert again.choices[0].text == r.choices[0].text  # same seed, same tokens
    other = c.completions.create(model=str(folder), prompt=prompt, max_tokens=30, **{**kw, "seed": 8})
    greedy = generate(model, tok, tok.encode(prompt), GenerationConfig(max_new_tokens=30))
    assert {other.choices[0].text, greedy.text} != {r.choices[0].text}


def test_end_token_never_leaks(server, served_model):
    url, _ = server
    _, tok, folder = served_model
    c = client(url)
    msgs = [{"role": "user", "content": "Hi"}]
    # force <|end|>: the answer ends at once, with nothing printed
    r = c.chat.completions.create(model=str(folder), messages=msgs, max_tokens=10, temperature=0,
                                  logit_bias={str(tok.end_id): 100})
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1
    # ignore_eos (extension): special tokens are generated but still never printed
    for stream in (False, True):
        r = c.chat.completions.create(model=str(folder), messages=msgs, max_tokens=12, temperature=0,
                                      logit_bias={str(tok.end_id): 100}, stream=stream,
                                      extra_body={"ignore_eos": True})
        text = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
        assert text == ""
    r = c.completions.create(model=str(folder), prompt="The quick", max_tokens=200, temperature=1.0, seed=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 200
    assert_no_special(r.choices[0].text)


# ------------------------------------------------------------------------------------------------------------------
# Acceptance 2: 16 concurrent streaming clients, each equal to its sequential greedy output


def test_sixteen_concurrent_streams_equal_sequential_greedy(server, served_model):
    url, _ = server
    model, tok, folder = served_model
    words = ["Tom", "Lily", "The quick", "Once upon", "Pip", "def add", "café", "A big red ball", "stars",
             "cloud", "Oh no", "robot", "park", "dog", "fox", "math"]
    prompts = [f"{w} {i}" for i, w in enumerate(words)]
    n = [16 + 3 * i for i in range(16)]  # different lengths: rows finish and free at different steps
    expected = [generate(model, tok, tok.encode(p), GenerationConfig(max_new_tokens=k)).text
                for p, k in zip(prompts, n)]
    before = health(url)
    results: dict[int, str] = {}
    barrier = threading.Barrier(16)

    def run(i):
        c = client(url)
        barrier.wait(timeout=T)
        s = c.completions.create(model=str(folder), prompt=prompts[i], max_tokens=n[i], temperature=0, stream=True)
        results[i] = "".join(ch.choices[0].text for ch in s)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert len(results) == 16
    for i in range(16):
        assert results[i] == expected[i], f"stream {i}"
    after = health(url)
    assert after["peak_running"] > 1  # decode steps were batched
    assert after["requests"] - before["requests"] == 16 and after["running"] == 0


# ------------------------------------------------------------------------------------------------------------------
# Acceptance 3: bad requests get 4xx with an error body; the server keeps serving; disconnects free slots


def test_bad_requests_get_4xx_error_bodies_and_server_keeps_serving(server, served_model):
    url, _ = server
    _, _, folder = served_model
    mid = str(folder)
    big = b'{"model": "m", "prompt": "' + b"a" * 10_000_000 + b'"}'
    cases = [
        (400, dict(content=b'{"prompt": "hi", ')),  # malformed JSON
        (400, dict(content=b'[1, 2]')),
        (422, dict(json={"prompt": "hi", "max_tokens": "10"})),  # wrong types
        (422, dict(json={"prompt": 5})),
        (422, dict(json={"prompt": "hi", "temperature": 9})),
        (422, dict(json={"max_tokens": 5})),  # no prompt
        (400, dict(json={"prompt": "hi " * 2000})),  # too long for the context
        (400, dict(json={"prompt": [[5, 999999]]})),  # token id outside the vocabulary
        (413, dict(content=big)),  # 10 MB body
        (404, dict(json={"model": "gpt-4", "prompt": "hi"})),  # unknown model
    ]
    for status, kw in cases:
        headers = {"content-type": "application/json"}
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=T, **kw)
        assert r.status_code == status, (kw.get("json"), r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["type"], err
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi " * 2000}, timeout=T)
    assert "context" in r.json()["error"]["message"] and "Shorten" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}, timeout=T)
    assert r.status_code == 422 and "role" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing", timeout=T)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(url + "/v1/models/nope", timeout=T).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    # still serving
    r = client(url).completions.create(model=mid, prompt="Tom", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens >= 1 and health(url)["status"] == "ok"


def test_client_disconnect_mid_stream_frees_its_slot(server, served_model):
    url, _ = server
    _, _, folder = served_model
    before = health(url)
    body = {"model": str(folder), "prompt": "Once upon a time", "max_tokens": 1000, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=T) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert health(url)["running"] == 1
    wait_for(lambda: health(url)["running"] == 0, "the slot to be freed")
    after = health(url)
    assert after["cancelled"] == before.get("cancelled", 0) + 1
    assert after["tokens"] - before["tokens"] < 1000  # stopped early, not run to the end
    # a non-streaming client that gives up (read timeout) frees its slot too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(T, read=0.5))
    wait_for(lambda: health(url)["running"] == 0, "the slot to be freed")
    final = health(url)
    assert final["cancelled"] == after["cancelled"] + 1 and final["tokens"] - after["tokens"] < 1000


# ------------------------------------------------------------------------------------------------------------------
# Queue (429), authentication (401), graceful shutdown


def test_queue_full_auth_and_graceful_shutdown(served_model):
    model, tok, _ = served_model
    url, stop = start_background((model, tok), model_id="tiny", max_batch=1, max_queue=1, api_key="sekret")
    try:
        assert httpx.get(url + "/v1/models", timeout=T).status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=T)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert [m.id for m in client(url, api_key="sekret").models.list().data] == ["tiny"]

        auth = {"Authorization": "Bearer sekret"}
        long = {"model": "tiny", "prompt": "Tom", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=T, headers=auth) as h1, httpx.Client(timeout=T, headers=auth) as h2:
            with h1.stream("POST", url + "/v1/completions", json=long) as a:
                lines = a.iter_lines()  # keep a reference: a dropped iterator closes the connection
                assert a.status_code == 200 and next(lines).startswith("data: {")
                wait_for(lambda: health(url)["running"] == 1, "a running request")
                with h2.stream("POST", url + "/v1/completions", json=long) as b:
                    wait_for(lambda: health(url)["waiting"] == 1, "a waiting request")
                    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth,
                                   timeout=T)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                    assert "Retry-After" in r.headers
            wait_for(lambda: health(url)["running"] == 0 and health(url)["waiting"] == 0, "both cancelled")

        # graceful shutdown: a request in flight finishes; new connections are refused afterwards
        result = {}

        def in_flight():
            s = client(url, api_key="sekret").completions.create(
                model="tiny", prompt="Lily", max_tokens=300, stream=True, temperature=0,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = list(s)
            result["finish"] = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            result["tokens"] = chunks[-1].usage.completion_tokens

        t = threading.Thread(target=in_flight)
        t.start()
        wait_for(lambda: health(url)["running"] == 1, "the request to start")
    finally:
        stop()
    t.join(T)
    assert result == {"finish": "length", "tokens": 300}
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


# ------------------------------------------------------------------------------------------------------------------
# logprobs / echo: log-likelihood evaluation against a served model


def test_completion_logprobs_and_echo_equal_a_forward_pass(server, served_model):
    url, _ = server
    model, tok, folder = served_model
    ids = tok.encode("Tom and Lily went to the park")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # (T, V)
    c = client(url)
    # lm-evaluation-harness style: token-id prompt, echo, one generated token, logprobs=1
    r = c.completions.create(model=str(folder), prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    got = r.choices[0].logprobs
    assert len(got.token_logprobs) == len(ids) + 1 and got.token_logprobs[0] is None
    want = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))] + [float(lp[-1].max())]
    assert got.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert got.tokens[:len(ids)] == [tok.decode([i]) for i in ids]
    for i in range(1, len(ids)):
        (best, v), = got.top_logprobs[i].items()
        assert best == tok.decode([int(lp[i - 1].argmax())]) and v == pytest.approx(float(lp[i - 1].max()), abs=1e-4)
    assert r.choices[0].text.startswith(tok.decode(ids))
    # scoring only: max_tokens 0
    r0 = c.completions.create(model=str(folder), prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want[:-1], abs=1e-4)
    assert r0.usage.completion_tokens == 0 and r0.choices[0].text == tok.decode(ids)
    # a batch of prompts, in order
    rb = c.completions.create(model=str(folder), prompt=[ids[:3], ids], max_tokens=0, echo=True, logprobs=0)
    assert [ch.index for ch in rb.choices] == [0, 1]
    assert rb.choices[1].logprobs.token_logprobs == r0.choices[0].logprobs.token_logprobs
    # chat logprobs: one entry per generated token, top alternatives sorted
    rc = c.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=3)
    content = rc.choices[0].logprobs.content
    assert len(content) == rc.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)


def test_text_prompt_gets_the_tokenizers_bos_and_echo_offsets_index_the_text(served_model, trained_tokenizer,
                                                                             tmp_path):
    """A tokenizer whose tokenizer.json prepends <s> (as Phi-3's): a text prompt is transformers' `tokenizer(prompt)`,
    <s> first, and scored so; the echoed <s> is not in the echoed text and takes no room in text_offset, so scoring
    by offsets (phiforge eval on the URL) gives the local scores."""
    from transformers import AutoTokenizer

    from conftest import with_bos_post_processor
    from phiforge.eval.lm import LocalLM
    from phiforge.eval.openai_backend import OpenAILM

    model, _, _ = served_model
    tok = with_bos_post_processor(trained_tokenizer)
    save_hf_folder(model, tmp_path, tok)
    prompt = "Tom and Lily went to the park"
    ids = AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids
    assert ids[0] == tok.bos_id
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    pairs = [("Tom and Lily", " went to the park"), ("The quick", " brown fox")]
    url, stop = start_background(str(tmp_path), max_batch=4, max_queue=8)
    try:
        r = client(url).completions.create(model=str(tmp_path), prompt=prompt, max_tokens=0, echo=True, logprobs=0)
        remote = OpenAILM(url + "/v1", str(tmp_path)).loglikelihood(pairs, progress=False)
    finally:
        stop()
    got = r.choices[0].logprobs
    assert r.usage.prompt_tokens == len(ids) and got.tokens == [tok.decode([i]) for i in ids]
    assert got.token_logprobs[1:] == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
    assert r.choices[0].text == prompt
    assert got.text_offset == [0] + [len(tok.decode(ids[1:i])) for i in range(1, len(ids))]
    local = LocalLM(*load(str(tmp_path))).loglikelihood(pairs, progress=False)
    assert [x[0] for x in remote] == pytest.approx([x[0] for x in local], abs=1e-4)


def test_lm_eval_local_completions_scores_like_a_forward_pass(server, served_model):
    """lm-evaluation-harness' `local-completions` model (test-only; needs `lm-eval[api]`) against the server."""
    pytest.importorskip("tenacity")
    api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    url, _ = server
    model, tok, folder = served_model
    lm = api.LocalCompletionsAPI(base_url=url + "/v1/completions", model=str(folder), tokenizer=str(folder),
                                 tokenizer_backend="huggingface", tokenized_requests=True, max_retries=1)
    pairs = [("Tom and Lily", " went to the park"), ("The quick", " brown fox")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids, n = tok.encode(ctx + cont), len(tok.encode(ctx))
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        assert ll == pytest.approx(sum(float(lp[i - 1, ids[i]]) for i in range(n, len(ids))), abs=1e-3)
        assert greedy == all(int(lp[i - 1].argmax()) == ids[i] for i in range(n, len(ids)))


# ------------------------------------------------------------------------------------------------------------------
# CLI: `python -m phiforge.serve` in its own process, SIGTERM mid-stream; user-fixable start-up errors


def test_cli_process_serves_and_shuts_down_gracefully_on_sigterm(served_model):
    import os
    import re
    import signal
    import subprocess
    import sys

    folder = str(served_model[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phiforge.serve", folder, "--port", "0", "--threads", "1",
                             "--shutdown-timeout", "30"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()  # the start-up line names the URL
        m = re.search(r"on (http://127.0.0.1:\d+)/v1", line)
        assert m, line
        url = m.group(1)
        body = {"prompt": "Tom", "max_tokens": 150, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=T) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)  # graceful: this stream still runs to its end
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 150
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_cli_user_errors(tmp_path, served_model):
    from phiforge.serve import main

    with pytest.raises(UserError):
        main([str(tmp_path / "missing"), "--port", "0"])
    with pytest.raises(UserError, match="max-batch"):
        main([str(served_model[2]), "--max-batch", "0"])
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(UserError, match="another --port"):
            main([str(served_model[2]), "--port", str(s.getsockname()[1])])
