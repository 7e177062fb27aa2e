"""Inference engine (phiforge.generate): parity with transformers' generate, cache exactness, batching, sampling,
stop handling, incremental detokenization and the `phiforge generate` CLI. Tiny random models: tokens, not text."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_model, saved_random_model
from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.generate import generate, main, stream_generate
from phiforge.sample import (GenerationConfig, IncrementalDetokenizer, StopStringFilter, make_penalty_processor,
                             make_sampler)
from phiforge.batch import BatchState
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3Config
from phiforge.utils import UserError


def reference_pair(preset, tmp_path):
    """transformers' tiny random model and the same weights loaded by phiforge."""
    cfg = config_from_name(preset)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    hf_cfg["sliding_window"] = cfg.sliding_window  # the reference runs window + 1 (trained semantics, conftest)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    model, _ = load(str(tmp_path))
    return cfg, ref, model


def hf_greedy(ref, ids, n, logits=False):
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    return (tokens, torch.cat(out.logits).float()) if logits else tokens


def event_logits(model, ids, **kw):
    events = list(stream_generate(model, None, ids, stop_ids=(), **kw))
    return [e.token_id for e in events], torch.stack([e.logits for e in events])


@pytest.fixture(scope="module")
def tok_model(trained_tokenizer, tmp_path_factory):
    """A tiny model whose vocabulary is the trained tokenizer's, saved as an HF folder with the tokenizer."""
    return saved_random_model(trained_tokenizer, tmp_path_factory.mktemp("tokmodel"))


# ------------------------------------------------------------------------------------------------------------------
# Acceptance: greedy tokens equal transformers' generate (64 new tokens)

FAMILIES = {
    "tiny-4k": 20,  # sliding window 15: 84 tokens, far past the window
    "tiny-128k": 20,  # LongRoPE, original_max 32: generation crosses the boundary (cache recomputed)
    "tiny-gqa": 20,
    "tiny-phi4": 12,  # partial rotary + tied + LongRoPE crossing at a different step
}


@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_equals_transformers(preset, tmp_path):
    """Tokens equal, and every step's logits equal transformers' (so a degenerate, repetitive random model cannot
    hide a wrong LongRoPE switch or window)."""
    cfg, ref, model = reference_pair(preset, tmp_path)
    torch.manual_seed(7)
    ids = torch.randint(3, cfg.vocab_size, (FAMILIES[preset],)).tolist()
    want, want_logits = hf_greedy(ref, ids, 64, logits=True)
    got, got_logits = event_logits(model, ids, max_new_tokens=64, prefill_chunk=8)
    assert got == want
    err = (got_logits - want_logits).abs().max().item()
    assert err <= 1e-4, f"{preset}: max logit difference to transformers {err:.2e}"
    if cfg.rope_scaling is not None:
        assert len(ids) <= cfg.original_max_position_embeddings < len(ids) + 64  # the switch is exercised
        # guard: fixing the long factors up front ("fixed" policy) is a different computation
        _, fixed_logits = event_logits(model, ids, max_new_tokens=64, rope_policy="fixed")
        assert (fixed_logits - want_logits).abs().max().item() > 1e-2
    if cfg.sliding_window is not None:
        assert len(ids) + 64 > 2 * cfg.sliding_window


def test_long_prompt_prefilled_with_long_factors(tmp_path):
    cfg, ref, model = reference_pair("tiny-128k", tmp_path)
    ids = torch.randint(3, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    got = generate(model, None, ids, max_new_tokens=16, stop_ids=(), prefill_chunk=10)  # chunks straddle 32
    assert got.token_ids == hf_greedy(ref, ids, 16)


# ------------------------------------------------------------------------------------------------------------------
# Acceptance: cached decoding equals the full forward pass at every step


@pytest.mark.parametrize("preset,max_len", [("tiny-128k", None), ("tiny-4k", None), ("tiny-4k", 24),
                                            ("tiny-phi4", None)])
def test_cached_logits_equal_full_forward(preset, max_len):
    """Every step's logits equal model(full sequence)[-1] (transformers' per-call LongRoPE rule). tiny-4k with 24
    slots: a ring-like cache of window + prefill chunk, kept exact by compaction that evicts out-of-window keys."""
    model, _ = load(preset, seed=1)
    cfg = model.config
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 17, 28)]
    events = list(stream_generate(model, None, prompts, max_new_tokens=30, stop_ids=(), prefill_chunk=8,
                                  max_len=max_len))
    assert len(events) == 90
    worst = 0.0
    per_seq: dict[int, list] = {}
    for ev in events:
        per_seq.setdefault(ev.index, []).append(ev)
    with torch.no_grad():
        for i, evs in per_seq.items():  # rebuild each sequence's history and compare step by step
            history = list(prompts[i])
            for ev in evs:
                full = model(torch.tensor([history]))[0, -1].float()
                worst = max(worst, (full - ev.logits).abs().max().item())
                history.append(ev.token_id)
    assert worst <= 1e-4, f"max |cached - full| = {worst:.2e}"


def test_compiled_decode_equals_eager_and_compiles_once():
    """`generate --compile`: the decode step is compiled once for the cache's static shape and reused at every step,
    past the sliding window too (a recompile per token would make it far slower than eager: a benchmark hit exactly
    that through a stride guard); tokens equal eager and per-step logits agree within 1e-4."""
    from torch._dynamo.utils import counters

    model, _ = load("tiny-4k", seed=3)  # window 15: 27 prompt + 24 new tokens run past it
    prompt = list(range(3, 30))
    want_tokens, want_logits = event_logits(model, prompt, max_new_tokens=24)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits = event_logits(model, prompt, max_new_tokens=24, compile=True)
        tokens2, _ = event_logits(model, prompt, max_new_tokens=24, compile=True)  # a second request reuses it
    assert tokens == want_tokens == tokens2
    assert (logits - want_logits).abs().max().item() <= 1e-4
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ------------------------------------------------------------------------------------------------------------------
# Acceptance: batching equals one at a time, with per-sequence stopping


@pytest.mark.parametrize("preset", ["tiny-128k", "tiny-4k"])
def test_batch_of_eight_equals_one_at_a_time(preset):
    model, _ = load(preset, seed=2)
    cfg = model.config
    lengths = [3, 30, 9, 41, 1, 17, 25, 12]  # tiny-128k: some prompts start past original_max, some cross it
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist()
               for n in lengths]
    probe = generate(model, None, prompts[0], max_new_tokens=24, stop_ids=())
    stop = {probe.token_ids[6]}  # ends prompt 0 early; the others stop wherever they meet it, or run to length
    config = GenerationConfig(max_new_tokens=24, stop_ids=stop, prefill_chunk=16)
    singles = [generate(model, None, p, config) for p in prompts]
    batched = generate(model, None, prompts, config)
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in singles]
    # logits too: a random model's greedy tokens repeat a lot and could hide a wrong computation
    solo_logits = [torch.stack([e.logits for e in stream_generate(model, None, p, config)]) for p in prompts]
    batch_logits: dict[int, list] = {}
    for ev in stream_generate(model, None, prompts, config):
        batch_logits.setdefault(ev.index, []).append(ev.logits)
    for i, want in enumerate(solo_logits):
        assert (torch.stack(batch_logits[i]) - want).abs().max().item() <= 1e-4, i
    reasons = {r.finish_reason for r in batched}
    assert reasons == {"stop", "length"}, reasons  # per-sequence stopping is exercised
    assert len(batched[0].token_ids) <= 7


def test_batch_state_add_and_remove_between_steps():
    """Continuous batching: sequences join while others decode, one is cancelled; each equals its solo run."""
    model, _ = load("tiny-gqa", seed=4)
    prompts = [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (7, 19, 4, 11)]
    config = GenerationConfig(max_new_tokens=12, stop_ids=())
    solo = [generate(model, None, p, config).token_ids for p in prompts]
    state = BatchState(model, None, max_batch=3, max_len=31)  # small: forces compaction
    compactions = []
    compact = state.compact
    state.compact = lambda: (compactions.append(state.cursor), compact())
    seqs = [state.add(prompts[0], config, index=0)]
    out: dict[int, list[int]] = {}
    steps = 0
    cancelled = None
    while state.active() or len(seqs) < 4:
        if steps == 3:
            seqs.append(state.add(prompts[1], config, index=1))
            cancelled = state.add(prompts[3], config, index=3)
        if steps == 5:
            state.remove(cancelled)
        if steps == 6:
            seqs.append(state.add(prompts[2], config, index=2))
            seqs.append(cancelled)
        for ev in state.step():
            out.setdefault(ev.index, []).append(ev.token_id)
        steps += 1
    assert cancelled.finish_reason == "cancelled"
    assert compactions, "the test must exercise compaction"
    for i in range(3):
        assert out[i] == solo[i], i
    assert state.cache_bytes() == state.cache.nbytes() > 0


# ------------------------------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible():
    model, _ = load("tiny", seed=5)
    prompts = [[5, 6, 7, 8], [9, 10]]
    kw = dict(max_new_tokens=20, stop_ids=(), temperature=1.3, top_k=50, top_p=0.95, min_p=0.01,
              repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)
    a = generate(model, None, prompts[0], seed=11, **kw).token_ids
    b = generate(model, None, prompts[0], seed=11, **kw).token_ids
    c = generate(model, None, prompts[0], seed=12, **kw).token_ids
    assert a == b
    assert a != c
    batched = generate(model, None, prompts, seed=11, **kw)
    assert batched[0].token_ids == a  # per-sequence generators: batching does not change a seeded sample
    greedy = generate(model, None, prompts[0], max_new_tokens=20, stop_ids=()).token_ids
    assert generate(model, None, prompts[0], max_new_tokens=20, stop_ids=(), temperature=2.0, top_k=1,
                    seed=3).token_ids == greedy


def test_sampler_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draw = lambda s: {int(s(logits, gen)) for _ in range(300)}  # noqa: E731
    assert draw(make_sampler(0.0)) == {0}
    assert draw(make_sampler(1.0, top_k=2)) == {0, 1}
    p = torch.softmax(logits, -1)[0]
    assert draw(make_sampler(1.0, top_p=float(p[0] + p[1] * 0.5))) == {0, 1}  # smallest set reaching top_p
    assert draw(make_sampler(1.0, min_p=float(p[2] / p[0]) * 0.99)) == {0, 1, 2}
    assert draw(make_sampler(1.0)) == set(range(6))


def test_penalty_processor():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    ctx = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    gen = torch.tensor([[0.0, 2.0, 0.0, 1.0]])
    assert make_penalty_processor() is None
    rep = make_penalty_processor(repetition_penalty=2.0)(logits, ctx, gen)
    assert rep.tolist() == [[1.0, -4.0, 1.0, 3.0]]
    pf = make_penalty_processor(presence_penalty=0.5, frequency_penalty=0.25)(logits, ctx, gen)
    assert pf.tolist() == [[2.0, -3.0, 1.0, 2.25]]


# ------------------------------------------------------------------------------------------------------------------
# Text: stop strings and incremental detokenization


def test_stop_string_across_token_boundary(tok_model):
    model, tok, _ = tok_model
    prompt = tok.encode("Once upon a time")
    free = generate(model, tok, prompt, max_new_tokens=40, stop_ids=())
    pieces = [tok.decode([t]) for t in free.token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and free.text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[:i + 1])) - 1)
    stop = pieces[k][-1] + pieces[k + 1][0]
    deltas = []
    for ev in stream_generate(model, tok, prompt, max_new_tokens=40, stop_ids=(), stop_strings=["\x00never", stop]):
        deltas.append(ev.text)
        last = ev
    streamed = "".join(deltas)
    assert last.finish_reason == "stop"
    assert stop not in streamed
    assert streamed == free.text[:free.text.find(stop)] == last.seq.text
    assert len(last.seq.generated) == k + 2  # stopped on the token that completed the stop string


def test_stop_string_filter_holds_partial_matches():
    f = StopStringFilter(["END", "xy"])
    assert f.feed("abcE") == ("abc", False)
    assert f.feed("N") == ("", False)
    assert f.feed("D more") == ("", True)
    g = StopStringFilter(["END"])
    assert g.feed("aEN") == ("a", False)
    assert g.feed("x") == ("ENx", False)
    assert g.flush() == ""


def test_incremental_detokenizer_never_splits_utf8(trained_tokenizer):
    tok = trained_tokenizer
    text = "Unicode: 東京 naïve 🙂 ∑ x² ≤ ∞ café 🙂🙂"
    ids = tok.encode(text)
    # the test is meaningful only if some token boundary falls inside a character
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:"))
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_special_and_stop_tokens_are_not_printed(tok_model):
    model, tok, _ = tok_model
    end = tok.token_to_id("<|end|>")
    assert end in tok.stop_ids
    prompt = tok.encode("Tom and Lily")
    probe = generate(model, tok, prompt, max_new_tokens=10, stop_ids=())
    # make <|end|> the winner at step 4 with a logits processor: generation ends there by tokenizer.stop_ids
    def force_end(logits, ctx, gen):
        if int(gen.sum()) == 4:
            logits = logits.clone()
            logits[:, end] = 1e9
        return logits
    r = generate(model, tok, prompt, max_new_tokens=10, extra_processors=[force_end])
    assert r.finish_reason == "stop" and r.token_ids[-1] == end and len(r.token_ids) == 5
    assert r.token_ids[:4] == probe.token_ids[:4]
    assert "<|end|>" not in r.text and r.text == tok.decode(probe.token_ids[:4], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_streams_generated_text_only(tok_model, capsys):
    model, tok, folder = tok_model
    assert main([str(folder), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    want = generate(model, tok, tok.encode("Once upon a time", add_special_tokens=True), max_new_tokens=12)
    assert out == want.text + "\n"
    assert "tokens/s" in err and "time-to-first-token" in err


def test_cli_chat_template_and_sampling(tok_model, capsys):
    model, tok, folder = tok_model
    args = [str(folder), "--prompt", "Hi", "--chat", "--max-new-tokens", "10", "--temperature", "0.9", "--seed", "4"]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    want = generate(model, tok, ids, max_new_tokens=10, temperature=0.9, seed=4)
    assert out == want.text + "\n"


def test_cli_on_a_bos_tokenizer_gives_transformers_greedy_tokens(trained_tokenizer, tmp_path, capsys):
    """A tokenizer whose tokenizer.json prepends <s> (as Phi-3's): `phiforge generate` without --chat continues
    transformers' `tokenizer(prompt)`, <s> first, with transformers' greedy tokens."""
    from transformers import AutoTokenizer

    from conftest import with_bos_post_processor

    tok = with_bos_post_processor(trained_tokenizer)
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    ref = hf_model(cfg)  # no sliding window
    ref.save_pretrained(tmp_path)
    tok.save(tmp_path)
    prompt, n = "Once upon a time", 16
    ids = AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids
    assert ids[0] == tok.bos_id
    want = hf_greedy(ref, ids, n)
    model, tok = load(str(tmp_path))
    stop = next((i for i, t in enumerate(want) if t in tok.stop_ids), n)  # phiforge ends at a stop token
    assert main([str(tmp_path), "--prompt", prompt, "--max-new-tokens", str(n)]) == 0
    out, err = capsys.readouterr()
    assert f"prompt {len(ids)} tokens" in err and f"[{min(stop + 1, n)} tokens" in err
    assert out == tok.decode(want[:stop], skip_special_tokens=True) + "\n"
    assert generate(model, tok, prompt, max_new_tokens=n).token_ids == want[:stop + 1]


def test_cli_errors_are_user_errors(tmp_path):
    model, _ = load("tiny")
    save_hf_folder(model, tmp_path)  # no tokenizer
    with pytest.raises(UserError, match="no tokenizer"):
        main([str(tmp_path), "--prompt", "x"])
    with pytest.raises(UserError, match="rope_policy"):
        GenerationConfig(rope_policy="sometimes")


def test_loglikelihood_matches_transformers(tmp_path):
    from phiforge.scoring import loglikelihood
    cfg, ref, model = reference_pair("tiny-128k", tmp_path)
    g = torch.Generator().manual_seed(9)
    ctxs = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 30, 12, 40)]
    conts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 1, 6)]
    conts[2] = [hf_greedy(ref, ctxs[2], 1)[0]]  # a greedy continuation
    got = loglikelihood(model, ctxs, conts, batch_size=3)
    for (lp, is_greedy), ctx, cont in zip(got, ctxs, conts):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0, len(ctx) - 1:-1].float(), -1)
        want = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(lp - want) < 1e-3, (lp, want)
        assert is_greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert got[2][1] is True


def test_cache_full_ends_with_length_event():
    """A sequence that outgrows a server-sized cache gets a final event with finish_reason "length"."""
    model, _ = load("tiny", seed=6)
    state = BatchState(model, None, max_batch=2, max_len=16)
    seq = state.add(list(range(5, 15)), GenerationConfig(max_new_tokens=100, stop_ids=()))
    events = []
    while state.active():
        events += state.step()
    assert [e.finish_reason for e in events] == [None] * 6 + ["length"]
    assert len(seq.tokens) == 17 and seq.finish_reason == "length"
    solo = generate(model, None, list(range(5, 15)), max_new_tokens=7, stop_ids=())
    assert seq.generated == solo.token_ids


@pytest.mark.parametrize("preset,max_len,n", [("tiny-4k", 24, 40), ("tiny-128k", None, 20), ("tiny-gqa", 16, 10)])
def test_single_stream_equals_one_row_batch(preset, max_len, n):
    """One prompt runs without the batching machinery; it gives exactly BatchState's tokens, logits and finish
    reason: past a sliding window in a short cache (ring prefill, compaction), across the LongRoPE switch, and when
    the cache runs out ("length")."""
    model, _ = load(preset, seed=1)
    prompt = torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    config = GenerationConfig(max_new_tokens=30, stop_ids=(), prefill_chunk=8, temperature=0.8, seed=3,
                              repetition_penalty=1.3)
    max_len = max_len or n + 30
    solo = list(stream_generate(model, None, prompt, config, max_len=max_len))
    state = BatchState(model, None, max_batch=1, max_len=max_len)
    state.add(prompt, config)
    batched = []
    while state.active():
        batched += state.step()
    assert [e.token_id for e in solo] == [e.token_id for e in batched]
    assert [e.finish_reason for e in solo] == [e.finish_reason for e in batched]
    assert torch.equal(torch.stack([e.logits for e in solo]), torch.stack([e.logits for e in batched]))
