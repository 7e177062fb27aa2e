"""Released configs (../shared/reference/phi3) parse to the dimensions of PHI3_SPEC section 1."""
import json
import math

import pytest

from phiforge.models import config_from_hf, config_from_name
from phiforge.models.phi3 import PRESETS, Phi3, Phi3Config, RotaryEmbedding
from phiforge.utils import UserError, shared_dir

# file -> (layers, hidden, q heads, kv heads, head_dim, rotary dim, ffn, vocab, window, factors, tied)
EXPECTED = {
    "Phi-3-mini-4k-instruct/config.json": (32, 3072, 32, 32, 96, 96, 8192, 32064, 2047, 0, False),
    "Phi-3-mini-128k-instruct/config.april2024-su.json": (32, 3072, 32, 32, 96, 96, 8192, 32064, 262144, 48, False),
    "Phi-3-medium-4k-instruct/config.json": (40, 5120, 40, 10, 128, 128, 17920, 32064, 2047, 0, False),
    "Phi-3-medium-128k-instruct/config.json": (40, 5120, 40, 10, 128, 128, 17920, 32064, 131072, 64, False),
    "Phi-3.5-mini-instruct/config.TRANSCRIBED.json": (32, 3072, 32, 32, 96, 96, 8192, 32064, 262144, 48, False),
    "Phi-4-mini-instruct/config.TRANSCRIBED.json": (32, 3072, 24, 8, 128, 96, 8192, 200064, 262144, 48, True),
}


def reference(name):
    root = shared_dir()
    if root is None or not (root / "reference/phi3" / name).exists():
        pytest.skip(f"../shared/reference/phi3/{name} is absent")
    hf = json.loads((root / "reference/phi3" / name).read_text())
    # TRANSCRIBED files mark unrecovered values as "<<...>>" strings; the spec gives phi-4-mini's eos as 199999.
    return {k: (199999 if isinstance(v, str) and v.startswith("<<") and k == "eos_token_id" else v)
            for k, v in hf.items()}


@pytest.mark.parametrize("name", EXPECTED)
def test_reference_config_dimensions(name):
    cfg = Phi3Config.from_hf(reference(name))
    L, C, nh, nkv, hd, rd, ff, V, win, nf, tied = EXPECTED[name]
    got = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
           cfg.rotary_dim, cfg.intermediate_size, cfg.vocab_size, cfg.sliding_window,
           len(cfg.rope_scaling["long_factor"]) if cfg.rope_scaling else 0, cfg.tie_word_embeddings)
    assert got == EXPECTED[name]
    if cfg.rope_scaling:  # mscale(32, 4096) from PHI3_SPEC 12
        with __import__("torch").device("meta"):
            assert math.isclose(RotaryEmbedding(cfg).mscale, 1.1902380714238083, rel_tol=1e-12)


def test_su_and_longrope_are_the_same():
    hf = reference("Phi-3-mini-128k-instruct/config.april2024-su.json")
    su = Phi3Config.from_hf(hf)
    hf["rope_scaling"] = dict(hf["rope_scaling"], type="longrope")
    assert Phi3Config.from_hf(hf).rope_scaling == su.rope_scaling


@pytest.mark.parametrize("name", ["Phi-3-small-8k-instruct/config.TRANSCRIBED.json",
                                  "Phi-3-vision-128k-instruct/config.TRANSCRIBED.json"])
def test_other_families_are_refused_clearly(name):
    hf = reference(name)
    with pytest.raises(UserError, match=f"model_type '{hf['model_type']}' is not supported: .* phi3"):
        config_from_hf(hf)  # the loader looks for phiforge/models/<model_type>.py
    with pytest.raises(UserError, match="not the dense 'phi3' family"):
        Phi3Config.from_hf(hf)


def test_presets_match_spec_parameter_counts():
    # phi-3-mini 3.8B, phi-3-medium 14B, phi-4-mini 3.8B (report and model cards)
    assert round(config_from_name("phi-3-mini-4k").num_params() / 1e9, 1) == 3.8
    assert round(config_from_name("phi-3-medium-4k").num_params() / 1e9) == 14
    assert round(config_from_name("phi-4-mini").num_params() / 1e9, 1) == 3.8
    import torch
    for name in PRESETS:
        cfg = config_from_name(name)
        with torch.device("meta"):
            assert Phi3(cfg).num_params() == cfg.num_params(), name


def test_bad_rope_configs():
    with pytest.raises(UserError, match="unknown rope_scaling type 'yarn'"):
        config_from_name("tiny", rope_scaling={"type": "yarn", "short_factor": [1] * 8,
                                                           "long_factor": [1] * 8})
    with pytest.raises(UserError, match="rotary_dim/2 = 8"):
        config_from_name("tiny", rope_scaling={"type": "su", "short_factor": [1] * 6,
                                                           "long_factor": [1] * 6})
