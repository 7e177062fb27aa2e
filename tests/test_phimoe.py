"""Phi-3.5-MoE (models/phimoe.py): logit parity with transformers' PhimoeForCausalLM on tiny random models, cached
decoding against the full forward, config round trips and dispatch.

Reference: transformers models/phimoe/modular_phimoe.py (5.x as installed). transformers 5 stores the experts fused
(`mlp.experts.gate_up_proj` (E, 2F, C) = [w1; w3], `mlp.experts.down_proj` (E, C, F) = w2) and names the router
`mlp.router` in memory; phiforge keeps the Hub checkpoint's names (PHI3_SPEC 5.1), so the in-memory copy maps
them (`to_phiforge`). On save_pretrained transformers 5 writes the Hub names back, which phiforge.load reads as is.

Only LongRoPE's short regime (positions < original_max_position_embeddings) is compared: transformers 5's
PhimoeRotaryEmbedding.forward calls rope_init_fn(config) without seq_len, so it rotates with the SHORT factors at
every length while switching the mscale to long_mscale past original_max. The released model (and phiforge) use
the long factors there, so in the long regime the reference is wrong and no comparison is made yet.
"""
import json

import pytest
import torch

from phiforge.models import config_from_hf, config_from_name
from phiforge.models.phimoe import PhiMoE, PhiMoEConfig, sparsemixer_top2
from phiforge.step import decode_one_token, prefill
from phiforge.utils import UserError

LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 1.5 * i for i in range(8)], "short_mscale": 1.1, "long_mscale": 1.4}
CASES = {
    # name: changes to tiny-moe (4 experts, GQA 4 query heads over 2 kv heads, no rope scaling)
    "4-experts": {},
    "8-experts-gqa4": dict(num_local_experts=8, num_key_value_heads=1),
    "longrope-short": dict(num_local_experts=6, max_position_embeddings=1024, original_max_position_embeddings=32,
                           rope_scaling=LONGROPE),
}


def hf_reference(cfg: PhiMoEConfig, seed: int = 0):
    from transformers import PhimoeConfig, PhimoeForCausalLM

    d = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    hf_cfg = PhimoeConfig(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = PhimoeForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # perturb norms and biases too, so that every tensor matters
        for name, p in ref.named_parameters():
            if "layernorm" in name or name.startswith("model.norm"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return ref


def to_phiforge(hf_state: dict, cfg: PhiMoEConfig) -> dict:
    """transformers 5's fused expert layout -> the Hub checkpoint names phiforge uses."""
    out, F_ = {}, cfg.intermediate_size
    for name, t in hf_state.items():
        if ".mlp.router." in name:
            out[name.replace(".mlp.router.", ".block_sparse_moe.gate.")] = t
        elif name.endswith(".mlp.experts.gate_up_proj"):  # (E, 2F, C): gate (w1) first, then up (w3)
            prefix = name.removesuffix("mlp.experts.gate_up_proj") + "block_sparse_moe.experts"
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = t[e, :F_], t[e, F_:]
        elif name.endswith(".mlp.experts.down_proj"):  # (E, C, F)
            prefix = name.removesuffix("mlp.experts.down_proj") + "block_sparse_moe.experts"
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e]
        else:
            out[name] = t
    return out


def pair(case: str):
    cfg = config_from_name("tiny-moe", **CASES[case])
    ref = hf_reference(cfg)
    model = PhiMoE(cfg).eval()
    model.load_state_dict(to_phiforge(ref.state_dict(), cfg), strict=True)
    return cfg, ref, model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    cfg, ref, model = pair(case)
    torch.manual_seed(1)
    T = 20 if cfg.rope_scaling else 40  # LongRoPE: stay below original_max (32), see the module doc
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    err = (got - want).abs().max().item()
    print(f"{case}: max abs logit error {err:.2e}")
    assert err <= 1e-5, f"{case}: max abs logit error {err:.2e}"
    want_loss = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - want_loss.item()) <= 1e-5


def test_router_matches_transformers_sparsemixer():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    torch.manual_seed(0)
    logits = torch.randn(500, 8) * torch.rand(500, 1) * 3  # includes near-ties, negative maxima, both bands
    logits[:5] = torch.tensor([1.0, 0.99, 0.5, -1, -2, 0.2, 0.1, 0.0])  # second logit inside the 2% band
    want_w, want_i = sparsemixer(logits, jitter_eps=0.01, training=False)
    got_w, got_i = sparsemixer_top2(logits, 0.01)
    assert torch.equal(got_i, want_i) and torch.equal(got_w, want_w)
    assert (got_w.sum(-1) > 1.01).any(), "weights are not renormalised: a clear winner gives ~1 each"


@pytest.mark.parametrize("case", ["8-experts-gqa4", "longrope-short"])
def test_cached_decoding_equals_full_forward(case):
    cfg, _, model = pair(case)
    torch.manual_seed(2)
    T, P = 24, 10  # prompt P tokens in chunks of 4, then one token at a time
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids)  # (2, T, V)
        cache = model.make_cache(2, T)
        pos = torch.arange(T)[None].expand(2, T)
        got = [prefill(model, ids[:, :P], pos[:, :P], cache, 0, chunk=4)]
        for t in range(P, T):
            got.append(decode_one_token(model, ids[:, t], pos[:, t], cache, torch.tensor([t])))
    err = (torch.stack(got, dim=1) - full[:, P - 1:]).abs().max().item()
    print(f"{case}: cached vs full max abs error {err:.2e}")
    assert err <= 1e-5, f"{case}: cached decoding differs from the full forward by {err:.2e}"


def test_config_round_trips_and_dispatch():
    from transformers import PhimoeConfig

    cfg = config_from_name("tiny-moe", **CASES["longrope-short"])
    assert PhiMoEConfig.from_hf(cfg.to_hf()) == cfg
    d = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    saved = json.loads(PhimoeConfig(**d).to_json_string())  # transformers 5's layout (rope_parameters)
    assert config_from_hf(saved) == cfg
    released = {**config_from_name("phi-3.5-moe").to_hf(), "architectures": ["PhiMoEForCausalLM"]}
    assert type(config_from_hf(json.loads(json.dumps(released)))) is PhiMoEConfig
    assert config_from_hf(released).rope_scaling["long_mscale"] == 1.243163121016122
    with pytest.raises(UserError, match="num_experts_per_tok"):
        config_from_name("tiny-moe", num_experts_per_tok=1)


def test_training_forward_samples_and_every_weight_gets_a_gradient():
    """Train mode routes stochastically (SparseMixer-v2: tests/test_phimoe_router.py compares it with transformers);
    router_sampling off and no input jitter give the deterministic inference routing."""
    import dataclasses

    cfg, _, model = pair("4-experts")
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.manual_seed(0)
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    torch.manual_seed(0)
    assert torch.equal(loss, model(ids[:, :-1], targets=ids[:, 1:]))  # the draws come from the global RNG
    assert not torch.equal(loss, model(ids[:, :-1], targets=ids[:, 1:]))
    loss.backward()
    moe = model.model.layers[0].block_sparse_moe
    assert all(p.grad is not None for p in moe.experts.parameters()) and moe.gate.weight.grad.abs().sum() > 0
    det = PhiMoE(dataclasses.replace(cfg, router_sampling=False, input_jitter_noise=0.0)).train()
    det.load_state_dict(model.state_dict())
    assert torch.equal(det(ids), model.eval()(ids))


def test_long_regime_uses_long_factors_and_long_mscale():
    """Not comparable with transformers 5 (module doc); checked against the formula of PHI3_SPEC 3.2 instead."""
    from phiforge.models.phimoe import RotaryEmbedding

    cfg = config_from_name("tiny-moe", **CASES["longrope-short"])
    rope = RotaryEmbedding(cfg)
    hs = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2).float() / hs))
    for T, kind in ((20, "short"), (50, "long")):
        pos = torch.arange(T)[None]
        angles = pos[..., None].float() * base / torch.tensor(LONGROPE[f"{kind}_factor"])
        want = torch.cat((angles, angles), -1).cos() * LONGROPE[f"{kind}_mscale"]
        assert torch.allclose(rope(pos)[0], want, atol=1e-6), kind


def test_load_folder_saved_by_transformers(tmp_path):
    """transformers 5 converts its fused experts back to the Hub names on save_pretrained, so phiforge.load reads a
    saved folder as it would a released checkpoint."""
    from phiforge import load

    cfg = config_from_name("tiny-moe", **CASES["longrope-short"])
    ref = hf_reference(cfg)
    ref.save_pretrained(tmp_path)
    model, _ = load(str(tmp_path))
    assert model.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err <= 1e-5, f"max abs logit error {err:.2e}"
