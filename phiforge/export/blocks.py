"""ggml's q8_0, q4_0 and q4_K block formats (numpy, float32): q8_0 and q4_0 are gguf.quants' (bit-exact with
ggml's reference quantizers); q4_K is our own, since gguf-py only dequantizes it.

References (read, not copied): ggml/src/ggml-common.h (block_q8_0, block_q4_0, block_q4_K) and
ggml/src/ggml-quants.c (quantize_row_q8_0_ref, quantize_row_q4_0_ref, get_scale_min_k4) in ggml-org/llama.cpp.
The tests check that gguf.quants dequantizes the q4_K bytes we write to exactly `dequantize_q4_k` below, and the
q8_0 / q4_0 bytes against a transcription of ggml's reference formulas.

  q8_0: 32 weights -> fp16 d, int8 q[32];              w = d * q,          d = absmax / 127
  q4_0: 32 weights -> fp16 d, 16 bytes of nibbles;     w = d * (q - 8),     d = (signed max) / -8
        byte j holds q[j] (low nibble) and q[j + 16] (high nibble)
  q4_K: 256 weights = 8 sub-blocks of 32 -> fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes;
        w = d * sc[j] * q - dmin * m[j]; bytes 32p..32p+31 hold sub-block 2p (low) and 2p+1 (high nibbles)

Our q4_K quantizer picks each sub-block's scale/min from its range (not llama.cpp's iterative search), so its
error is a little larger than llama-quantize's; the bytes are valid q4_K either way.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as QT

BLOCK = {"q8_0": 32, "q4_0": 32, "q4_k": 256}
BYTES = {"q8_0": 34, "q4_0": 18, "q4_k": 144}


def _blocks(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    assert x.shape[-1] % n == 0, f"last dim {x.shape[-1]} is not a multiple of the block size {n}"
    return x.reshape(-1, n)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> 12 bytes (inverse of ggml's get_scale_min_k4)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float [..., K] (K % 256 == 0) -> uint8 [..., K / 256 * 144]."""
    sub = _blocks(x, 256).reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0).astype(np.float32)
    hi = np.maximum(sub.max(axis=2), 0).astype(np.float32)
    scale, mins = (hi - lo) / np.float32(15), -lo  # per sub-block, before 6-bit quantization
    d = (scale.max(axis=1) / np.float32(63)).astype(np.float16)
    dmin = (mins.max(axis=1) / np.float32(63)).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.round(scale / d32), 0, 63), 0).astype(np.uint8)
        m = np.where(dmin32 > 0, np.clip(np.round(mins / dmin32), 0, 63), 0).astype(np.uint8)
        eff_s, eff_m = d32 * sc.astype(np.float32), dmin32 * m.astype(np.float32)
        q = np.where(eff_s[..., None] > 0, np.round((sub + eff_m[..., None]) / eff_s[..., None]), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)  # (n, 8, 32)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_scales_k4(sc, m), qs],
                         axis=1)
    return out.reshape(*x.shape[:-1], -1)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    b = np.asarray(data, dtype=np.uint8).reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = _unpack_scales_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    ds = (d * sc.astype(np.float32))[..., None]
    dm = (dmin * m.astype(np.float32))[..., None]
    return (ds * q - dm).reshape(*data.shape[:-1], -1)


QUANTIZE = {"q8_0": partial(quants.quantize, qtype=QT.Q8_0), "q4_0": partial(quants.quantize, qtype=QT.Q4_0),
            "q4_k": quantize_q4_k}
DEQUANTIZE = {"q8_0": partial(quants.dequantize, qtype=QT.Q8_0), "q4_0": partial(quants.dequantize, qtype=QT.Q4_0),
              "q4_k": dequantize_q4_k}
