"""Phi-3.5-MoE (models/phimoe.py): logit parity with transformers' PhimoeForCausalLM on tiny random models, cached
decoding against the full forward, config round trips and dispatch.

Reference: transformers models/phimoe/modular_phimoe.py (5.x as installed). transformers 5 stores the experts fused
(`mlp.experts.gate_up_proj` (E, 2F, C) = [w1; w3], `mlp.experts.down_proj` (E, C, F) = w2) and names the router
`mlp.router` in memory; phiforge keeps the Hub checkpoint's names (PHI3_SPEC 5.1), so the in-memory copy maps
them (`to_phiforge`). On save_pretrained transformers 5 writes the Hub names back, which phiforge.load reads as is.

A reference bug, corrected in the long-regime tests: transformers 5's PhimoeRotaryEmbedding.forward calls
`rope_init_fn(config)` without the sequence length, so it rotates with the SHORT factors at every length while
switching the mscale to long_mscale past original_max_position_embeddings. The released model (Microsoft's
modeling_phimoe.py) and phiforge use the long factors there. `corrected_rotary` patches that one call to pass the
sequence length (what transformers' own longrope init reads to pick the factors); the short regime is compared
against transformers as it is.
"""
import contextlib
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
    # inputs of 50 positions cross original_max (32): the long factors and long_mscale
    "longrope-long": dict(num_local_experts=5, max_position_embeddings=1024, original_max_position_embeddings=32,
                          rope_scaling=LONGROPE),
}
LENGTH = {"longrope-short": 20, "longrope-long": 50}  # default 40


@contextlib.contextmanager
def corrected_rotary():
    """transformers 5 with its one PhiMoE LongRoPE bug fixed (module doc): the init function gets the sequence
    length, so past original_max the long factors are used with the long mscale, as in the original model."""
    from transformers.models.phimoe import modeling_phimoe as m

    def forward(self, x, position_ids=None):
        seq_len = int(torch.max(position_ids)) + 1
        rp = self.config.rope_parameters
        inv_freq, mscale = self.rope_init_fn(self.config, x.device, seq_len)  # the corrected call
        if rp["rope_type"] != "default":
            mscale = rp["long_mscale"] if seq_len > rp["original_max_position_embeddings"] else rp["short_mscale"]
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    original = m.PhimoeRotaryEmbedding.forward
    m.PhimoeRotaryEmbedding.forward = forward
    try:
        yield
    finally:
        m.PhimoeRotaryEmbedding.forward = original


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
    ids = torch.randint(0, cfg.vocab_size, (2, LENGTH.get(case, 40)))
    fix = corrected_rotary() if case == "longrope-long" else contextlib.nullcontext()
    with torch.no_grad(), fix:
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


@pytest.mark.parametrize("case", ["8-experts-gqa4", "longrope-short", "longrope-long"])
def test_cached_decoding_equals_full_forward(case):
    """Prompt P tokens in chunks of 4, then one token at a time. A sequence that will cross original_max is decoded
    in the long regime from its first token (as `generate` decides per sequence), so the full forward is too."""
    cfg, _, model = pair(case)
    torch.manual_seed(2)
    T, P = (44, 10) if case == "longrope-long" else (24, 10)
    long_rope = True if case == "longrope-long" else None
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids, long_rope=long_rope)  # (2, T, V)
        cache = model.make_cache(2, T)
        pos = torch.arange(T)[None].expand(2, T)
        got = [prefill(model, ids[:, :P], pos[:, :P], cache, 0, chunk=4, long_rope=long_rope)]
        for t in range(P, T):
            got.append(decode_one_token(model, ids[:, t], pos[:, t], cache, torch.tensor([t]), long_rope=long_rope))
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
    """The rotary tables against the formula of PHI3_SPEC 3.2, independently of transformers, in both regimes."""
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


def test_transformers_loads_what_phiforge_saves(tmp_path):
    """The reverse direction: a phiforge model (its own init, perturbed) saved with save_hf_folder loads in
    transformers' PhimoeForCausalLM with equal logits, in both LongRoPE regimes (long: the corrected reference)."""
    from transformers import PhimoeForCausalLM

    from phiforge.checkpoint import save_hf_folder

    cfg = config_from_name("tiny-moe", **CASES["longrope-long"])
    model = PhiMoE(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():  # biases and norms are 0 and 1 after init: perturb them so that they are compared too
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_hf_folder(model.eval(), tmp_path)
    ref = PhimoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for T in (20, 50):
        ids = torch.randint(0, cfg.vocab_size, (1, T))
        fix = corrected_rotary() if T > cfg.original_max_position_embeddings else contextlib.nullcontext()
        with torch.no_grad(), fix:
            err = (model(ids) - ref(ids).logits).abs().max().item()
        assert err <= 1e-5, f"T={T}: max abs logit error {err:.2e}"


def test_greedy_generate_equals_transformers_for_64_tokens():
    from phiforge.generate import generate

    cfg, ref, model = pair("8-experts-gqa4")
    prompt = torch.randint(3, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(model, None, [prompt], max_new_tokens=64, stop_ids=())
    got = got[0].token_ids if isinstance(got, list) else got.token_ids
    assert len(want) == 64 and got == want
