"""Training Phi-3.5-MoE's family (tiny-moe) through the shared trainers: pretrain learns, routes tokens to every
expert, changes every parameter, logs and plots the expert load, exports a folder transformers loads; SFT, DPO and
LoRA run; a SIGKILLed run resumes bit for bit. torchrun DDP and FSDP2: tests/test_phimoe_train_distributed.py (a
file of its own, as the dense model's, to keep each file under a minute on two cores).

The training router samples (SparseMixer-v2, tests/test_phimoe_router.py). Its draws come from torch's global RNG,
which exact-resume checkpoints save and restore, so the resume test runs the sampling router as is."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from phiforge.models import config_from_name
from phiforge.train import dpo, pretrain, sft
from phiforge.train.common import expert_load_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dpo import write_pairs  # noqa: E402
from test_sft import common as sft_args, write_data  # noqa: E402
from test_train import assert_resume_is_exact, data, losses, tiny_args  # noqa: E402,F401  (data is a fixture)


def records(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def moe_args(data, out, **kw) -> list[str]:
    return tiny_args(data, out, **{"model": "tiny-moe", "seq_len": 32, "threads": 1, **kw})


def test_moe_pretrain_learns_uses_every_expert_logs_load_and_exports(tmp_path, data):
    from transformers import AutoModelForCausalLM

    from phiforge.checkpoint import build_model, load_hf_folder
    from phiforge.models.phi3 import Phi3
    from phiforge.train import plot

    out = tmp_path / "run"
    assert pretrain.main(moe_args(data, out, max_steps=12, seed=3, export=True, eval_every=12, ckpt_every=12)) == 0
    ls = losses(out)
    rows = [r for r in records(out) if "loss" in r]
    print(f"tiny-moe pretrain: loss {ls[0]:.3f} -> {ls[-1]:.3f}; last moe/load {rows[-1]['moe/load']}")
    assert ls[-1] < ls[0] - 0.5
    load = torch.tensor([r["moe/load_layers"] for r in rows])  # (steps, L, E) shares
    assert load.shape == (12, 2, 4) and torch.allclose(load.sum(-1), torch.ones(12, 2), atol=1e-4)
    assert (load.sum(0) > 0).all()  # every expert of every layer received tokens
    assert all(len(r["moe/load"]) == 4 and abs(sum(r["moe/load"]) - 1) < 1e-4 for r in rows)

    trained = load_hf_folder(out / "final")
    init = build_model(trained.config, init=False)
    init.init_weights(seed=3)  # the run's starting point
    start = dict(init.named_parameters())
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged, unchanged
    hf = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    x = torch.randint(0, trained.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trained.eval()(x), rtol=1e-4, atol=1e-4)

    assert plot.main([str(out)]) == 0  # loss panel + the two expert-load heatmaps
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert expert_load_record(Phi3(config_from_name("tiny"))) == {}  # a dense model logs nothing new


def test_moe_sft_dpo_and_lora_run(tmp_path, data):
    """SFT (full and LoRA on the attention projections) and DPO a few steps each from a tiny-moe base folder."""
    from phiforge.checkpoint import load_hf_folder, save_hf_folder
    from phiforge.models.phimoe import PhiMoE
    from phiforge.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(data / "a" / "tokenizer")
    base = tmp_path / "base"
    cfg = config_from_name("tiny-moe", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           bos_token_id=tok.bos_id or 0)
    model = PhiMoE(cfg)
    model.init_weights(seed=0)
    save_hf_folder(model, base, tok)

    chats = write_data(tmp_path, n=40)
    assert sft.main(sft_args(tmp_path / "sft", chats, base, "--max_steps", "3", "--lr", "1e-3")) == 0
    rows = [r for r in records(tmp_path / "sft") if "loss" in r]
    assert len(rows) == 3 and all(len(r["moe/load"]) == 4 for r in rows)
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()

    assert sft.main(sft_args(tmp_path / "lora", chats, base, "--max_steps", "3", "--lr", "1e-2", "--lora", "true",
                             "--lora_r", "4", "--packing", "false")) == 0
    adapter = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids = torch.tensor([[5, 17, 40, 99, 3, 8]])
    merged, plain = load_hf_folder(tmp_path / "lora" / "final").eval(), load_hf_folder(base).eval()
    assert (merged(ids) - plain(ids)).abs().max() > 1e-4  # the adapters learned
    moe_weights = lambda m: {k: v for k, v in m.state_dict().items() if "block_sparse_moe" in k}  # noqa: E731
    assert all(torch.equal(v, moe_weights(plain)[k]) for k, v in moe_weights(merged).items())  # experts frozen

    pairs = write_pairs(tmp_path, 24)
    assert dpo.main(["--model", str(base), "--out", str(tmp_path / "dpo"), "--data", pairs, "--seq_len", "128",
                     "--batch_size", "4", "--val_frac", "0.2", "--log_every", "1", "--threads", "1", "--max_steps",
                     "3", "--lr", "1e-3", "--warmup_steps", "0", "--export", "false"]) == 0
    rows = [r for r in records(tmp_path / "dpo") if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and len(r["moe/load"]) == 4 for r in rows)


def test_moe_sigkill_at_random_step_then_resume_is_exact(tmp_path, data):
    """tests/test_train.py's exact-resume check on tiny-moe with the sampling router: the checkpoint's RNG state
    carries the router's draws across the kill."""
    steps = 24
    kw = dict(max_steps=steps, ckpt_every=4, eval_every=8, batch_size=4, grad_accum=2,
              sources={"a": str(data / "a"), "b": str(data / "b")}, phases=[{"weights": {"a": 0.5, "b": 0.5}}])
    ref, run, _, resumed_from = assert_resume_is_exact(lambda out: moe_args(data, out, **kw), tmp_path, steps,
                                                       (5, 16))
    load = lambda p: [x["moe/load"] for x in records(p) if "loss" in x]  # noqa: E731
    assert load(run)[resumed_from:] == load(ref)[resumed_from:]  # the same routing after the resume


def test_moe_activation_checkpointing_replays_the_router_draws():
    """Recomputing a block in the backward pass must sample the same experts: torch.utils.checkpoint restores the
    global RNG, from which the router draws, so loss and gradients equal a run without checkpointing."""
    from phiforge.models.phimoe import PhiMoE

    model = PhiMoE(config_from_name("tiny-moe"))
    model.init_weights(seed=0)
    model.train()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    runs = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(4)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    load = model.pop_expert_load()  # a plain forward, a checkpointed one counted twice (its recompute): 3 x 2x16 x 2
    assert load.shape == (2, 4) and load.sum(-1).tolist() == [3 * 2 * 16 * 2] * 2
    assert model.pop_expert_load().sum() == 0  # popped: reset


def test_idle_experts_get_zero_gradients_in_training():
    """DDP and FSDP2 reduce the same gradients on every rank only if no expert's gradient is None where another
    rank's routing used it: in training an expert no token chose runs on 0 tokens and gets a zero gradient."""
    from phiforge.models.phimoe import SparseMoE

    moe = SparseMoE(config_from_name("tiny-moe", num_local_experts=8)).train()
    moe(torch.randn(1, 1, 64)).sum().backward()  # one token: 2 experts used, 6 idle
    grads = [e.w1.weight.grad for e in moe.experts]
    assert all(g is not None for g in grads) and sum(bool(g.abs().sum() > 0) for g in grads) == 2
