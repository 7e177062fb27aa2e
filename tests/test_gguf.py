"""GGUF export: the q8_0 / q4_0 blocks (gguf.quants) against ggml's reference formulas, our q4_K block code against
gguf-py's dequantization (bit-exact), and a tiny exported model read back with gguf's reader: every tensor, every
metadata key, the tokenizer and chat template."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from phiforge.export import blocks  # noqa: E402
from phiforge.export.gguf import GGUF_NAMES, export_gguf, gguf_name  # noqa: E402
from phiforge.models import config_from_name  # noqa: E402
from phiforge.models.phi3 import Phi3, Phi3Config  # noqa: E402
from phiforge.utils import UserError  # noqa: E402

QT = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
      "q4_k": gguf.GGMLQuantizationType.Q4_K}


def _weights(rows=6, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    x[1, :256] = -np.abs(x[1, :256])  # negative-dominated blocks: q4_0's signed max, q4_K's min
    x[2, :256] = np.abs(x[2, :256]) + 0.01  # strictly positive: q4_K's min clamps to 0
    x[3, 5] = 3.0  # an outlier
    return x


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_our_blocks_dequantize_exactly_like_gguf(fmt):
    x = _weights()
    data = blocks.QUANTIZE[fmt](x)
    assert data.dtype == np.uint8 and data.shape == (6, 512 // blocks.BLOCK[fmt] * blocks.BYTES[fmt])
    ours = blocks.DEQUANTIZE[fmt](data)
    theirs = gguf.quants.dequantize(data, QT[fmt])
    assert ours.shape == x.shape and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # and they are a quantization of x: bounded error everywhere, exact zeros stay zero
    bound = {"q8_0": 0.5 / 127, "q4_0": 1 / 8, "q4_k": 1 / 15 + 2 / 63}[fmt]
    amax = np.abs(x.reshape(-1, blocks.BLOCK[fmt])).max(1, keepdims=True)
    assert (np.abs(ours - x).reshape(-1, blocks.BLOCK[fmt]) <= amax * bound * 1.05 + 1e-6).all()
    assert (ours[0, :32] == 0).all()


# ggml's reference quantizers (ggml-quants.c quantize_row_q8_0_ref / quantize_row_q4_0_ref), transcribed: the
# oracle for the q8_0 / q4_0 bytes our files hold (blocks.py takes them from gguf.quants).
def ggml_ref_q8_0(x: np.ndarray) -> np.ndarray:
    """float [..., K] -> uint8 [..., K / 32 * 34]."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.round(b * inv).astype(np.int8)  # |b * inv| <= 127 by construction (roundf: half away from 0 differs
    # from np.round's half-to-even only on exact .5 ties, which still give a valid code)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def ggml_ref_q4_0(x: np.ndarray) -> np.ndarray:
    """float [..., K] -> uint8 [..., K / 32 * 18]. Like ggml: d = max / -8 where max is the signed value of
    largest magnitude, q = min(15, trunc(x / d + 8.5))."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(len(b)), idx][:, None]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.minimum(15, np.trunc(b * inv + np.float32(8.5))).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_our_quantizers_make_the_bytes_of_ggmls_reference(fmt):
    x = _weights(seed=1)
    ref = {"q8_0": ggml_ref_q8_0, "q4_0": ggml_ref_q4_0}[fmt](x)
    assert np.array_equal(blocks.QUANTIZE[fmt](x), ref)
    assert np.array_equal(blocks.QUANTIZE[fmt](x), gguf.quants.quantize(x, QT[fmt]))


def _tiny_model(preset: str, **kw):
    cfg = config_from_name(preset, hidden_size=256, intermediate_size=512, num_attention_heads=16,
                                               num_key_value_heads=4, **kw)
    torch.manual_seed(0)
    model = Phi3(cfg)
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_exported_file_reads_back_with_every_tensor_and_key(tmp_path, trained_tokenizer, kind):
    model = _tiny_model("tiny-128k", sliding_window=31)  # LongRoPE factors and a sliding window
    path = export_gguf(model, trained_tokenizer, tmp_path / "m.gguf", kind, name="tiny")
    r = gguf.GGUFReader(str(path))
    cfg = model.config

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("general.architecture") == "phi3"
    expect = {"phi3.block_count": 2, "phi3.embedding_length": 256, "phi3.feed_forward_length": 512,
              "phi3.attention.head_count": 16, "phi3.attention.head_count_kv": 4, "phi3.context_length": 1024,
              "phi3.rope.scaling.original_context_length": 32, "phi3.rope.dimension_count": cfg.rotary_dim,
              "phi3.attention.sliding_window": 31}
    for key, value in expect.items():
        assert field(key) == value, key
    assert field("phi3.rope.scaling.attn_factor") == pytest.approx(
        float(np.sqrt(1 + np.log(1024 / 32) / np.log(32))), rel=1e-6)
    assert field("phi3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and field("tokenizer.ggml.model") == "gpt2"
    assert tokens[trained_tokenizer.token_to_id("<|end|>")] == "<|end|>"
    assert field("tokenizer.ggml.eot_token_id") == trained_tokenizer.end_id
    assert field("tokenizer.chat_template") == trained_tokenizer.chat_template
    assert len(field("tokenizer.ggml.merges")) > 0

    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {gguf_name(k) for k in state} | {"rope_factors_long.weight", "rope_factors_short.weight"}
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, cfg.rope_scaling["long_factor"])
    for hf_name, w in state.items():
        t = tensors[gguf_name(hf_name)]
        assert tuple(int(d) for d in t.shape[::-1]) == w.shape, hf_name  # gguf lists dims fastest-first
        fmt = t.tensor_type.name.lower()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if fmt in ("q8_0", "q4_0", "q4_k"):
            want = blocks.DEQUANTIZE[fmt](blocks.QUANTIZE[fmt](w))
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), hf_name
        else:
            np.testing.assert_array_equal(got, w.astype(np.float16 if fmt == "f16" else np.float32))
    ffn = tensors["blk.0.ffn_up.weight"].tensor_type.name.lower()
    assert ffn == {"f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k"}[kind]


def test_mapping_is_complete_for_a_phi3_state_dict():
    model = _tiny_model("tiny")
    names = {gguf_name(k) for k in model.state_dict()}
    assert len(names) == len(model.state_dict())
    assert len(GGUF_NAMES) == 9


def test_unsupported_type_model_and_missing_tokenizer_are_one_clear_error(tmp_path, trained_tokenizer, capsys):
    from phiforge.cli import main as cli

    model = _tiny_model("tiny")
    with pytest.raises(UserError, match="unsupported GGUF type 'q5_k'"):
        export_gguf(model, trained_tokenizer, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(UserError, match="no tokenizer"):
        export_gguf(model, None, tmp_path / "x.gguf", "f16")
    with pytest.raises(UserError, match="no GGUF name"):
        gguf_name("model.layers.0.mlp.gate_proj.weight")
    assert not (tmp_path / "x.gguf").exists()
    assert cli(["export", "gguf", "tiny", "--type", "q3_k", "--out", str(tmp_path / "y.gguf")]) == 2
    assert cli(["export", "onnx", "tiny", "--out", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("phiforge: error: unsupported") for line in err)


def test_cli_exports_a_saved_model_folder(tmp_path, trained_tokenizer):
    from phiforge.checkpoint import save_hf_folder
    from phiforge.export import main

    save_hf_folder(_tiny_model("tiny"), tmp_path / "m", tokenizer=trained_tokenizer)
    assert main(["gguf", str(tmp_path / "m"), "--type", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_phimoe_exports_stacked_experts_an_f32_router_and_its_own_mscale(tmp_path, trained_tokenizer):
    """Without llama.cpp's converter at hand (tests/test_gguf_llama_cpp.py compares with it): arch "phimoe", each
    layer's experts stacked in expert order, the router f32 at q8_0, the model's explicit mscale."""
    rope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "short_mscale": 1.25,
            "long_mscale": 1.25}
    cfg = config_from_name("tiny-moe", vocab_size=trained_tokenizer.vocab_size, max_position_embeddings=1024,
                           original_max_position_embeddings=32, rope_scaling=rope)
    from phiforge.models.phimoe import PhiMoE

    model = PhiMoE(cfg)
    model.init_weights(seed=0)
    path = export_gguf(model, trained_tokenizer, tmp_path / "moe.gguf", "q8_0")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "phimoe"
    assert r.fields["phimoe.expert_count"].contents() == 4 and r.fields["phimoe.expert_used_count"].contents() == 2
    assert r.fields["phimoe.rope.scaling.attn_factor"].contents() == pytest.approx(1.25)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 16 + 5 + 2  # per block: 2 norms x 2, q/k/v/o x 2, router, 3 expert stacks; +
    # embedding, output norm x 2, output x 2; + the 2 rope factor tensors
    gate = tensors["blk.1.ffn_gate_inp.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(gate.data, model.model.layers[1].block_sparse_moe.gate.weight.detach().numpy())
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert list(down.shape) == [96, 64, 4] and down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    got = gguf.quants.dequantize(down.data, down.tensor_type).reshape(4, 64, 96)
    for e, expert in enumerate(model.model.layers[1].block_sparse_moe.experts):
        w = expert.w2.weight.detach().numpy()
        np.testing.assert_array_equal(got[e], blocks.DEQUANTIZE["q8_0"](blocks.QUANTIZE["q8_0"](w)))
