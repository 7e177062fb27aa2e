"""Logit parity with transformers' Phi3ForCausalLM (the reference) on tiny random copies of each family.

Reference: transformers models/phi3/modeling_phi3.py (5.x). The sliding window: the checkpoints were trained with
`sliding_window + 1` keys including the query (PHI3_SPEC 2.2); transformers 5 masks one fewer, so the reference
model is configured with window + 1 (see conftest.hf_config) and must then agree with ours exactly.
"""
import json

import pytest
import torch

from conftest import hf_model
from phiforge import load
from phiforge.checkpoint import save_hf_folder
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3Config

FAMILIES = {
    # preset: lengths that cross the window / original_max_position_embeddings
    "tiny-4k": [8, 40],  # sliding window 15: inputs shorter and longer than the window
    "tiny-128k": [20, 50],  # LongRoPE, original_max 32: short regime and long regime
    "tiny-gqa": [24],  # GQA 8 query heads over 2 kv heads
    "tiny-phi4": [20, 50],  # partial rotary 0.75 + tied embeddings + LongRoPE both regimes
}


def save_reference(ref, cfg, folder):
    """Save the reference as a released checkpoint would look: config.json carries the release's window number
    (the reference model itself runs with window + 1, which is the same trained semantics)."""
    ref.save_pretrained(folder, safe_serialization=True)
    hf_cfg = json.loads((folder / "config.json").read_text())
    hf_cfg["sliding_window"] = cfg.sliding_window
    (folder / "config.json").write_text(json.dumps(hf_cfg))


@pytest.mark.parametrize("preset", FAMILIES)
def test_hf_to_phiforge_logits(preset, tmp_path):
    cfg = config_from_name(preset)
    ref = hf_model(cfg)
    save_reference(ref, cfg, tmp_path)
    model, _ = load(str(tmp_path))
    torch.manual_seed(1)
    for T in FAMILIES[preset]:
        ids = torch.randint(0, cfg.vocab_size, (2, T))
        with torch.no_grad():
            want = ref(ids).logits
            got = model(ids)
        assert got.shape == (2, T, cfg.vocab_size)
        err = (got - want).abs().max().item()
        assert err <= 1e-5, f"{preset} T={T}: max abs logit error {err:.2e}"


@pytest.mark.parametrize("preset", FAMILIES)
def test_phiforge_to_hf_logits(preset, tmp_path):
    from transformers import Phi3ForCausalLM

    model, _ = load(preset, seed=3)
    with torch.no_grad():  # non-trivial norms so their loading is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_hf_folder(model, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    if hf_cfg["sliding_window"] is not None:  # trained semantics in transformers 5: window + 1 (see module doc)
        hf_cfg["sliding_window"] += 1
        (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    ref = Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, max(FAMILIES[preset])))
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err <= 1e-5, f"{preset}: max abs logit error {err:.2e}"


def test_window_semantics_differ_from_transformers_default(tmp_path):
    """Without the +1, transformers 5 sees one key fewer: logits past the window must then differ. This guards
    the test above against passing for a window that is never exercised."""
    from transformers import Phi3ForCausalLM

    from conftest import hf_config
    cfg = config_from_name("tiny-4k")
    ref = hf_model(cfg)
    save_reference(ref, cfg, tmp_path)
    model, _ = load(str(tmp_path))
    plain = Phi3ForCausalLM(hf_config(cfg, window_plus_one=False)).eval()
    plain.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        ours, theirs = model(ids), plain(ids).logits
    w = cfg.sliding_window
    assert torch.allclose(ours[:, : w], theirs[:, : w], atol=1e-5)  # inside the window: identical
    assert (ours[:, w + 1:] - theirs[:, w + 1:]).abs().max() > 1e-3  # past it: 2048 vs 2047 keys differ


def test_bf16_load_and_sharded_save(tmp_path):
    model, _ = load("tiny-gqa", seed=5)
    save_hf_folder(model, tmp_path, max_shard_bytes=64 * 1024)  # force several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    again, _ = load(str(tmp_path))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        bf16, _ = load(str(tmp_path), dtype="bfloat16")
        assert bf16.lm_head.weight.dtype == torch.bfloat16
        err = (bf16(ids).float() - model(ids)).abs().max().item()
    assert err < 0.1, err
