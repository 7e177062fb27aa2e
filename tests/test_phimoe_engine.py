"""The engine on a PhiMoE model, unchanged (issue 25): generate (single and batched), chat, perplexity, eval's
log-likelihoods and the OpenAI server each give what the plain full forward of the same model gives, and
`phiforge recipe --arch moe` resolves to a PhiMoE with the dense model's active parameters."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.generate import generate
from phiforge.models import config_from_name
from phiforge.models.phimoe import PhiMoE
from tests.conftest import SAMPLE_TEXT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def moe_dir(trained_tokenizer, tmp_path_factory):
    tok = trained_tokenizer
    cfg = config_from_name("tiny-moe", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                           pad_token_id=tok.pad_id, num_local_experts=6)
    model = PhiMoE(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # larger weights and nonzero biases: routing spreads, fewer near-ties
        for name, p in model.named_parameters():
            p.mul_(3.0) if p.dim() == 2 else p.add_(0.05 * torch.randn_like(p))
    return save_hf_folder(model.eval(), tmp_path_factory.mktemp("moe") / "m", tok)


def greedy_by_full_forward(model, ids: list[int], n: int) -> list[int]:
    """The reference: argmax of a full forward over the whole sequence at every step (no cache)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_generate_single_and_batched_equal_the_full_forward(moe_dir):
    model, tok = load(str(moe_dir))
    prompts = ["Once upon a time", "The little dog"]
    encoded = [tok.encode(p, add_special_tokens=True) for p in prompts]
    want = [greedy_by_full_forward(model, ids, 24) for ids in encoded]
    for ids, w in zip(encoded, want):  # one stream at a time
        assert generate(model, tok, [ids], max_new_tokens=24, stop_ids=())[0].token_ids == w
    batched = generate(model, tok, encoded, max_new_tokens=24, stop_ids=())  # two sequences in one batch
    assert [r.token_ids for r in batched] == want


def test_generate_and_chat_commands_run(moe_dir):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    gen = subprocess.run([sys.executable, "-m", "phiforge.cli", "generate", str(moe_dir), "--prompt", "Once upon",
                          "--max-new-tokens", "8"], capture_output=True, text=True, env=env, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert "tokens, finish=" in gen.stderr
    chat = subprocess.run([sys.executable, "-m", "phiforge.cli", "chat", str(moe_dir), "--max-new-tokens", "8"],
                          input="hello\n/exit\n", capture_output=True, text=True, env=env, timeout=120)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr


def test_perplexity_equals_the_full_forward_loss(moe_dir, tmp_path):
    from phiforge.perplexity import main

    model, tok = load(str(moe_dir))
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    out = tmp_path / "p.json"
    assert main([str(moe_dir), "--data", str(text), "--ctx", "200", "--rolling", "--json", str(out)]) == 0
    import json

    got = json.loads(out.read_text())
    ids = tok.encode(SAMPLE_TEXT, add_special_tokens=True)
    nll, n = 0.0, 0
    with torch.no_grad():  # disjoint 200-token windows, every token after the window's first predicted
        for s in range(0, len(ids) - 1, 200):
            w = torch.tensor([ids[s:s + 201]])
            if w.shape[1] < 2:
                break
            logits = model(w[:, :-1])
            nll += torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_eval_loglikelihoods_equal_the_full_forward(moe_dir):
    from phiforge.eval.lm import LocalLM

    model, tok = load(str(moe_dir))
    lm = LocalLM(model, tok, batch_size=3)
    pairs = [("Question: what is red?\nAnswer:", " an apple"), ("Question: what is red?\nAnswer:", " the sky"),
             ("Once upon a time", " there was a cat"), ("", "hello")]
    got = lm.loglikelihood(pairs)
    for (ctx, cont), (lp, _) in zip(pairs, got):
        c, k = lm.encode_pair(ctx, cont)
        ids = torch.tensor([list(c) + list(k)])
        with torch.no_grad():
            logp = model(ids)[0, len(c) - 1:-1].log_softmax(-1)
        want = logp.gather(-1, torch.tensor(k)[:, None]).sum().item()
        assert lp == pytest.approx(want, abs=1e-4)


def test_server_answers_like_generate(moe_dir):
    import httpx

    from phiforge.serve import start_background

    model, tok = load(str(moe_dir))
    url, stop = start_background(str(moe_dir), max_batch=4, max_queue=8)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        want = generate(model, tok, ["Once upon a time"], max_new_tokens=12, temperature=0.0)[0].text
        assert r.json()["choices"][0]["text"] == want
    finally:
        stop()


def test_recipe_arch_moe_resolves_to_a_phimoe_with_the_dense_active_parameters():
    from phiforge import recipe
    from phiforge.models.phi3 import Phi3Config

    def resolved(*flags):
        return recipe.resolve(recipe.build_parser().parse_args(["--smoke", *flags]))

    dense, moe = resolved(), resolved("--arch", "moe")
    assert moe["pretrain"]["model"] == "tiny-moe"
    d, m = dense["pretrain"]["model_args"], moe["pretrain"]["model_args"]
    assert m["num_local_experts"] == 4 and 2 * m["intermediate_size"] == d["intermediate_size"]
    assert {k: v for k, v in m.items() if k not in ("intermediate_size", "num_local_experts")} == \
        {k: v for k, v in d.items() if k != "intermediate_size"}
    # flags come after --arch: an explicit expert count wins
    assert resolved("--arch", "moe", "--set", "pretrain.model_args.num_local_experts=8")[
        "pretrain"]["model_args"]["num_local_experts"] == 8
    # the same active FFN parameters per token: 2 experts of half width = one dense FFN
    dense_cfg = config_from_name("tiny", **d)
    moe_cfg = config_from_name("tiny-moe", **m)
    assert isinstance(dense_cfg, Phi3Config)
    assert 2 * 3 * moe_cfg.hidden_size * moe_cfg.intermediate_size == \
        3 * dense_cfg.hidden_size * dense_cfg.intermediate_size
