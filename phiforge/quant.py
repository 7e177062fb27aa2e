"""Weight-only int8 / int4 quantization as a module swap after the model is built (the model files never mention it).

    phiforge quantize runs/demo/final --bits 4 --group-size 32 --out runs/demo/int4
    phiforge quantize runs/demo/final --bits 4 --group-size 32 --method gptq --calib corpus.txt --out runs/demo/gptq
    phiforge quantize runs/demo/final --bits 8 --out runs/demo/int8

References (read, not copied):
  * gpt-fast quantize.py (WeightOnlyInt4Linear / WeightOnlyInt8Linear, group-wise affine int4)
  * GPTQ: Frantar et al. 2022, arXiv:2210.17323, Algorithm 1, and IST-DASLab/gptq gptq.py (lazy block updates,
    Cholesky of the inverse Hessian)

Formats. int8: per output channel, symmetric, w = s[n] * q[n, k], q in -127..127. int4: per group of G input
weights, w = s * q + m with q in 0..15 (asymmetric: m = -zero * s; symmetric: m = -8 s), s and m stored fp16,
codes packed two per byte in 32-weight blocks (see `pack_int4`). A quantized checkpoint is model.safetensors with
those buffers plus quant_config.json naming every swapped module.

Deviations from the GPTQ paper, on purpose:
  1. Blocks are quantized in order with inputs from the already-quantized earlier blocks (as the paper), but the
     linears inside one block share one calibration pass (their Hessians come from the block's fp inputs).
  2. No activation reordering (act-order); group parameters are chosen when the group's first column is reached.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.utils import ArgumentParser, UserError, atomic_write_json, check_writable, normal_mode, progress

# The int4 group sizes `phiforge quantize` offers: the ones aten's int4 kernel takes and our kernel compiles in.
# (Int4Linear itself accepts any multiple of 32, e.g. from a checkpoint made elsewhere.)
GROUP_SIZES = (32, 64, 128, 256)
# The group size used when none is given, where it divides the model's in_features (gpt-fast's and GPTQ's default);
# otherwise the largest smaller one that does (the recipe's model has intermediate_size 704 = 11 x 64).
DEFAULT_GROUP_SIZE = 128

# ----------------------------------------------------------------------------------------------------------------
# Primitives: round-to-nearest quantize / dequantize, int4 packing


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [N, K] -> (q int8 [N, K], scales fp32 [N])."""
    w = w.float()
    s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def int4_params(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (both rounded to fp16, as stored) for each row of w [..., G]."""
    w = w.float()
    if symmetric:
        s = w.abs().amax(dim=-1).clamp(min=1e-8) / 7.0
        s = s.half().float()
        return s, -8.0 * s
    lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)  # 0 stays exactly representable
    s = ((hi - lo) / 15.0).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / s).clamp(0, 15)
    return s, (-zero * s).half().float()


def int4_codes(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Nearest code 0..15 for w [..., G] given per-row scale/offset [...]."""
    return torch.round((w.float() - m[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """Round-to-nearest group-wise int4: w [N, K] -> (codes uint8 [N, K] in 0..15, scales fp16 [N, K/G],
    offsets fp16 [N, K/G])."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    s, m = int4_params(g, symmetric)
    return int4_codes(g, s, m).reshape(N, K), s.half(), m.half()


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] (unpacked), scales/offsets [N, K/G] -> fp32 [N, K]. The oracle for every int4 path."""
    N, K = codes.shape
    G = K // scales.shape[1]
    q = codes.float().reshape(N, -1, G)
    return (q * scales.float()[..., None] + offsets.float()[..., None]).reshape(N, K)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> [N, K/2]. Per 32-weight block, byte j = q[j] | q[j+16] << 4 (ggml block_q4_0 order),
    so the kernel unpacks a block with one shift and one mask."""
    N, K = codes.shape
    b = codes.reshape(N, K // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    return torch.cat((b & 0x0F, b >> 4), dim=2).reshape(N, half * 2)


def tile_int4(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor):
    """Row layout -> the C++ kernel's tiles of 4 rows (phiforge/kernels/int4_mm.cpp): per tile, each 32-weight
    block is 64 contiguous bytes, bytes 0..7 of the four rows' 16-byte blocks then bytes 8..15, so the kernel reads
    one sequential stream per tile and one 32-byte load covers 8 weights of all four rows.
    qweight [N, K/2] -> wt [Np, K/2] (Np = N rounded up to 4, zero rows appended); scales/offsets [N, K/G] ->
    sm fp16 [Np/4, K/G, 8] (per group: the 4 scales, then the 4 offsets)."""
    N, half = qweight.shape
    pad = -N % 4
    if pad:
        qweight, scales, offsets = (F.pad(t, (0, 0, 0, pad)) for t in (qweight, scales, offsets))
    Np, ng = N + pad, scales.shape[1]
    # [tile, row, block, half, byte] -> [tile, block, half, row, byte]
    wt = qweight.reshape(Np // 4, 4, half // 16, 2, 8).permute(0, 2, 3, 1, 4).reshape(Np, half).contiguous()
    sm = torch.cat((scales.reshape(Np // 4, 4, ng).transpose(1, 2), offsets.reshape(Np // 4, 4, ng).transpose(1, 2)),
                   dim=2).half().contiguous()
    return wt, sm


def untile_int4(wt: torch.Tensor) -> torch.Tensor:
    """Inverse of tile_int4 for the weight bytes: wt [Np, K/2] -> qweight [Np, K/2] in row layout."""
    Np, half = wt.shape
    return wt.reshape(Np // 4, half // 16, 2, 4, 8).permute(0, 3, 1, 2, 4).reshape(Np, half).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Modules

_TILE_LOCK = threading.Lock()


class Int8Linear(nn.Module):
    """y = x @ (s * q)^T. Uses torch's packed int8 kernel (aten._weight_int8pack_mm) on CPU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.compute_dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        mod.compute_dtype = linear.weight.dtype
        mod.weight_int8, mod.scales = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().float().clone())
        return mod

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype (built on each access: for .device/.dtype and tools that
        read nn.Linear.weight, not for the hot path)."""
        return self.dequantize().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales.to(x2.dtype))
        else:
            y = F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Embedding rows stored int8 with one scale per row (token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32):
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings))
        self.out_dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        mod = cls(emb.num_embeddings, emb.embedding_dim, dtype=emb.weight.dtype)
        mod.weight_int8, mod.scales = quantize_int8(emb.weight.detach())
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized table (built on each access; not used by forward)."""
        return (self.weight_int8.float() * self.scales[:, None]).to(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.weight_int8).float() * self.scales[ids][..., None]).to(self.out_dtype)


class Int4Linear(nn.Module):
    """Group-wise int4 weights. CPU matmul: our AVX2 kernel (phiforge/kernels) when it builds, else torch's
    aten._weight_int4pack_mm_for_cpu, else dequantize + F.linear. All three compute x @ dequantize_int4(...)^T."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        if in_features % group_size or group_size % 32:
            raise UserError(f"int4 needs in_features ({in_features}) divisible by group_size ({group_size}), "
                            "and group_size a multiple of 32")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        ng = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float16))
        self.register_buffer("offsets", torch.zeros(out_features, ng, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.backend = "auto"  # "ours" | "torch" | "dequant"; auto picks the fastest available
        self._torch_packed = None
        # Our kernel's layout (tile_int4). With N % 4 == 0 the tiles replace qweight's bytes in place on first use,
        # so memory does not double; state_dict() and rows_qweight() still give the row layout. Otherwise
        # (N % 4 != 0: tiny test shapes) the padded tiles are a cached copy.
        self._tiled = False
        self._ours = None  # (wt, sm, key): the tiles and the scale/offset versions they were built from
        self.compute_dtype = torch.float32

    @classmethod
    def from_codes(cls, codes, scales, offsets, group_size: int, bias=None) -> "Int4Linear":
        N, K = codes.shape
        mod = cls(K, N, group_size, bias=bias is not None)
        mod.qweight, mod.scales, mod.offsets = pack_int4(codes), scales.half().contiguous(), offsets.half().contiguous()
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().float().clone())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        codes, s, m = quantize_int4(linear.weight.detach(), group_size, symmetric)
        mod = cls.from_codes(codes, s, m, group_size, linear.bias)
        mod.compute_dtype = linear.weight.dtype
        return mod

    def rows_qweight(self) -> torch.Tensor:
        """qweight in the row layout of `pack_int4` (what checkpoints store), whatever the in-memory layout."""
        return untile_int4(self.qweight) if self._tiled else self.qweight

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.rows_qweight()), self.scales, self.offsets)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tiled:
            destination[prefix + "qweight"] = self.rows_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._tiled, self._ours, self._torch_packed = False, None, None  # the incoming qweight is in row layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ours_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Under torch.compile the tiles come from an earlier eager call (the version check does not trace).
        if self._ours is None or not torch.compiler.is_compiling():
            key = (self.scales._version, self.offsets._version, self.scales.data_ptr(), self.offsets.data_ptr())
            if self._ours is None or self._ours[2] != key:
                # Setting qweight and _tiled is two steps: a second thread reading rows_qweight() between them
                # would retile tiles and scramble W. The server runs the model on one thread; this is cheap insurance.
                with _TILE_LOCK:
                    if self._ours is None or self._ours[2] != key:
                        wt, sm = tile_int4(self.rows_qweight(), self.scales, self.offsets)
                        if self.out_features % 4 == 0:
                            self.qweight, self._tiled = wt, True  # same shape, tiled bytes
                        # Tiled in place: keep None, not a second reference that .to() would leave behind.
                        self._ours = (None if self._tiled else wt, sm, key)
        wt, sm, _ = self._ours
        return (self.qweight if wt is None else wt), sm

    weight = Int8Linear.weight  # same contract: dequantized, model dtype, built per access

    def _torch_int4(self, x2: torch.Tensor) -> torch.Tensor:
        # torch's layout: w = (q - 8) * scale + zero, so zero = offset + 8 * scale; scales_and_zeros [K/G, N, 2].
        if self._torch_packed is None or self._torch_packed[1].dtype != x2.dtype:
            codes = unpack_int4(self.rows_qweight()).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            s, m = self.scales.float(), self.offsets.float()
            sz = torch.stack((s, m + 8 * s), dim=-1).transpose(0, 1).contiguous().to(x2.dtype)
            self._torch_packed = (packed, sz)
        packed, sz = self._torch_packed
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, self.group_size, sz)

    def _pick(self, x2: torch.Tensor) -> str:
        # Measured (docs/quant.md): with the tiled layout our kernel beats aten's at every group size, decode and
        # prefill (9216x3072, 128 rows, 2 threads: G=32 96 vs 145 ms, G=128 46 vs 144 ms).
        if x2.device.type != "cpu":
            return "dequant"
        if _kernel() is not None:
            return "ours"
        # aten's int4 packing needs N % 16 == 0 and one of its group sizes
        return "torch" if self.out_features % 16 == 0 and self.group_size in GROUP_SIZES else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        backend = self.backend
        if backend == "auto":
            backend = self._pick(x2)
        if backend == "ours":
            wt, sm = self._ours_args()
            y = _kernel()(x2.float().contiguous(), wt, sm, self.group_size)
            if y.shape[1] != self.out_features:  # padded last tile
                y = y[:, : self.out_features]
        elif backend == "torch":  # aten's kernel is fast with bf16 activations only (fp32 is ~15x slower)
            y = self._torch_int4(x2.to(torch.bfloat16))
        else:
            y = F.linear(x2.float(), self.dequantize().to(x2.device))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _kernel():
    from phiforge.kernels import int4_mm

    return int4_mm()


# ----------------------------------------------------------------------------------------------------------------
# Which modules get which format


def _linears(model) -> dict[str, nn.Linear]:
    """The linears quantization replaces: every block linear and the LM head."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (n.startswith("model.layers.") or n == "lm_head")}


def fitting_group_sizes(model) -> list[int]:
    """The offered int4 group sizes (GROUP_SIZES) that divide the in_features of every linear int4 replaces."""
    ins = {m.in_features for m in _linears(model).values()}
    return [g for g in GROUP_SIZES if all(k % g == 0 for k in ins)]


def default_group_size(model) -> int:
    """DEFAULT_GROUP_SIZE, or the largest smaller offered size that divides every in_features of this model."""
    fits = [g for g in fitting_group_sizes(model) if g <= DEFAULT_GROUP_SIZE]
    if not fits:
        ins = sorted({m.in_features for m in _linears(model).values()})
        raise UserError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides every in_features of this "
                        f"model ({', '.join(map(str, ins))}); use --bits 8")
    return fits[-1]


def _targets(model, bits: int, group_size: int, embed_bits: int | None) -> dict[str, dict]:
    """name -> {"kind": int4|int8|int8_embedding, ...}: every block linear at `bits`; lm_head at `bits` (or at 8
    with embed_bits=8); the embedding stays float unless embed_bits=8."""
    specs = {}
    for name, mod in _linears(model).items():
        if name != "lm_head":
            specs[name] = _linear_spec(model, mod, bits, group_size, name)
    specs["lm_head"] = _linear_spec(model, model.lm_head, 8 if embed_bits == 8 else bits, group_size, "lm_head")
    if embed_bits == 8:
        specs["model.embed_tokens"] = {"kind": "int8_embedding"}
    elif embed_bits is not None:
        raise UserError(f"--embed-bits must be 8 or omitted, not {embed_bits}")
    return specs


def _linear_spec(model, mod: nn.Linear, bits: int, group_size: int, name: str) -> dict:
    if bits == 8:
        return {"kind": "int8"}
    if bits != 4:
        raise UserError(f"--bits must be 4 or 8, not {bits}")
    if mod.in_features % group_size or group_size % 32 or group_size > 256:
        fits = fitting_group_sizes(model)  # the hint names only sizes that work for this model
        hint = (f"use --group-size {' or '.join(map(str, fits))}, which divide every in_features of this model" if fits
                else "no offered group size divides every in_features of this model; use --bits 8")
        raise UserError(f"{name}: in_features {mod.in_features} is not divisible by group size {group_size} ({hint})")
    return {"kind": "int4", "group_size": group_size}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _empty_module(spec: dict, old: nn.Module) -> nn.Module:
    if spec["kind"] == "int4":
        return Int4Linear(old.in_features, old.out_features, spec["group_size"], bias=old.bias is not None)
    if spec["kind"] == "int8":
        return Int8Linear(old.in_features, old.out_features, bias=old.bias is not None)
    return Int8Embedding(old.num_embeddings, old.embedding_dim, dtype=old.weight.dtype)


def _rtn_module(spec: dict, old: nn.Module, symmetric: bool) -> nn.Module:
    if spec["kind"] == "int4":
        return Int4Linear.from_linear(old, spec["group_size"], symmetric)
    if spec["kind"] == "int8":
        return Int8Linear.from_linear(old)
    return Int8Embedding.from_embedding(old)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ


def gptq_int4(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool = False, block: int = 128,
              damp: float = 0.01):
    """GPTQ (Frantar et al. 2022, Alg. 1) for one weight w [N, K] with Hessian H = 2 X^T X / n [K, K].
    Returns (codes, scales, offsets) in the same format as quantize_int4."""
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.detach().double().clone()  # float64: the Cholesky of a near-singular H is fragile in fp32
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    block = max(group_size, block // group_size * group_size)  # groups never straddle a lazy-update block
    codes = torch.zeros(N, K, dtype=torch.uint8)
    ng = K // group_size
    scales, offsets = torch.zeros(N, ng), torch.zeros(N, ng)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros(N, i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # parameters from the group's current (error-updated) weights
                s, m = int4_params(W1[:, i:i + group_size], symmetric)
                scales[:, col // group_size], offsets[:, col // group_size] = s, m
            q = int4_codes(W1[:, i:i + 1], s, m)[:, 0]
            codes[:, col] = q
            err = (W1[:, i] - (q.float() * s + m)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales.half(), offsets.half()


class _Stop(Exception):
    pass


def _collect_hessians(model, modules: dict[str, nn.Linear], stop_at: nn.Module, calib: torch.Tensor, batch: int):
    """Run calibration batches until `stop_at` has run; return {name: H} for the given linears."""
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    count = {"n": 0}

    def hook_for(name):
        def hook(mod, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            H[name].addmm_(x.t(), x, alpha=2.0)
        return hook

    def stop(mod, inputs, output):
        raise _Stop

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    handles.append(stop_at.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch):
                ids = calib[i:i + batch]
                count["n"] += ids.numel()
                try:
                    model(ids)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: h / count["n"] for n, h in H.items()}


def _gptq_swap(model, specs, stage: nn.Module, names: list[str], calib, batch, symmetric):
    linears = {n: model.get_submodule(n) for n in names if specs[n]["kind"] == "int4"}
    hessians = _collect_hessians(model, linears, stage, calib, batch)
    for name, lin in linears.items():
        codes, s, m = gptq_int4(lin.weight, hessians[name], specs[name]["group_size"], symmetric)
        new = Int4Linear.from_codes(codes, s, m, specs[name]["group_size"], lin.bias)
        new.compute_dtype = lin.weight.dtype
        _set_module(model, name, new)
    for n in names:  # int8 modules in the stage: round-to-nearest
        if n not in linears:
            _set_module(model, n, _rtn_module(specs[n], model.get_submodule(n), symmetric))


# ----------------------------------------------------------------------------------------------------------------
# quantize(model), save / load


@torch.no_grad()
def quantize(model, bits: int = 4, group_size: int | None = None, symmetric: bool = False, method: str = "rtn",
             calib: torch.Tensor | None = None, embed_bits: int | None = None, calib_batch: int = 8):
    """Swap the model's linears (and optionally the embedding) for quantized modules, in place; returns the model.
    method "gptq" needs calib: token ids [n_samples, T]. group_size None: default_group_size(model). The swap is
    recorded in model.quant_config."""
    if group_size is None:
        group_size = default_group_size(model) if bits == 4 else DEFAULT_GROUP_SIZE
    specs = _targets(model, bits, group_size, embed_bits)
    if method not in ("rtn", "gptq"):
        raise UserError(f"unknown method {method!r}: use rtn or gptq")
    if method == "gptq" and bits == 4:
        if calib is None or calib.numel() == 0:
            raise UserError("GPTQ needs calibration text: pass --calib FILE")
        model.float()  # Hessians and error feedback in fp32
        bar = progress(total=len(model.model.layers) + 1, desc="GPTQ", unit="block")  # minutes on a real model
        for i, blk in enumerate(model.model.layers):
            names = [n for n in specs if n.startswith(f"model.layers.{i}.")]
            _gptq_swap(model, specs, blk, names, calib, calib_batch, symmetric)
            bar.update()
        _gptq_swap(model, specs, model.lm_head, ["lm_head"], calib, calib_batch, symmetric)
        bar.update()
        bar.close()
        rest = [n for n in specs if n != "lm_head" and not n.startswith("model.layers.")]
    else:
        rest = list(specs)
    for name in rest:
        _set_module(model, name, _rtn_module(specs[name], model.get_submodule(name), symmetric))
    model.quant_config = {"format": "phiforge-quant", "version": 1, "bits": bits, "group_size": group_size,
                          "symmetric": symmetric, "method": method if bits == 4 else "rtn",  # int8 is always RTN
                          "embed_bits": embed_bits, "modules": specs}
    return model


def save_quantized(model, folder, tokenizer=None) -> Path:
    """config.json + model.safetensors (quantized buffers and float params) + quant_config.json (+ tokenizer)."""
    from safetensors.torch import save_file

    qc = getattr(model, "quant_config", None)
    if qc is None:
        raise UserError("model is not quantized; call phiforge.quant.quantize(model, ...) first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    atomic_write_json(folder / "config.json", {**cfg.to_hf(), "torch_dtype": "float32"})
    stop = sorted(tokenizer.stop_ids) if tokenizer is not None else [cfg.eos_token_id]
    atomic_write_json(folder / "generation_config.json",
                      {"bos_token_id": cfg.bos_token_id, "eos_token_id": stop, "pad_token_id": cfg.pad_token_id})
    if tokenizer is not None:
        tokenizer.save(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "quantization": "phiforge-quant"})
    normal_mode(tmp)
    tmp.replace(folder / "model.safetensors")
    atomic_write_json(folder / "quant_config.json", qc)
    return folder


def load_quantized(folder, dtype=torch.float32, device: str = "cpu"):
    """Inverse of save_quantized: (model, tokenizer or None)."""
    from safetensors.torch import load_file

    from phiforge.checkpoint import build_model, check_finite, read_config, resolve_dtype
    from phiforge.tokenizer import Tokenizer

    folder = Path(folder)
    qc = read_quant_config(folder)
    dtype = resolve_dtype(dtype)
    model = build_model(read_config(folder), dtype, device, init=False)
    for name, spec in qc["modules"].items():
        new = _empty_module(spec, model.get_submodule(name))
        new.out_dtype = new.compute_dtype = dtype
        _set_module(model, name, new)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: (v.to(dtype) if v.is_floating_point() and not _is_quant_buffer(k, qc) else v) for k, v in state.items()}
    check_finite(state, str(folder))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{folder}: quantized weights do not match quant_config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.quant_config = qc
    tok = Tokenizer.from_folder(folder) if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")) \
        else None
    return model.to(device).eval(), tok


def read_quant_config(folder) -> dict:
    path = Path(folder) / "quant_config.json"
    try:
        qc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(qc, dict) or qc.get("format") != "phiforge-quant" or not isinstance(qc.get("modules"), dict):
        raise UserError(f"{path} is not a phiforge quantization config")
    return qc


def quantized_shapes(cfg, qc: dict) -> dict[str, tuple]:
    """Tensor name -> shape of the model.safetensors save_quantized writes for this config and quant_config, built
    on the meta device (no memory), so `inspect` can check a quantized folder from its headers alone."""
    from phiforge import models

    with torch.device("meta"):
        model = models.build(cfg)
        for name, spec in qc["modules"].items():
            try:
                _set_module(model, name, _empty_module(spec, model.get_submodule(name)))
            except (AttributeError, KeyError):
                raise UserError(f"quant_config.json names module {name!r}, which this config has not "
                                f"(or with a bad spec {spec})") from None
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_quant_buffer(key: str, qc: dict) -> bool:
    mod, _, leaf = key.rpartition(".")
    return mod in qc["modules"] and leaf in ("qweight", "scales", "offsets", "weight_int8")


def load_any(path: str, dtype="float32"):
    """A quantized folder (quant_config.json) or anything phiforge.load accepts (load handles both)."""
    from phiforge import load

    return load(path, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Calibration data and CLI


def calibration_ids(tokenizer, path: str, n_samples: int = 128, seq_len: int = 512) -> torch.Tensor:
    """n_samples windows of seq_len tokens, evenly spread over the tokenized file."""
    from phiforge.perplexity import read_text

    ids = tokenizer.encode(read_text(path))
    if len(ids) < seq_len + 1:
        raise UserError(f"{path}: only {len(ids)} tokens; calibration needs at least seq_len={seq_len} (--seq-len)")
    n = min(n_samples, len(ids) // seq_len)
    starts = torch.linspace(0, len(ids) - seq_len, n).long().tolist()
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge quantize", description="Weight-only int8/int4 quantization.")
    ap.add_argument("model", help="HF model folder (or a preset name)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=None,
                    help=f"int4 group size: 32, 64, 128 or 256 (default: {DEFAULT_GROUP_SIZE}, or the largest "
                         "smaller one dividing every in_features of the model)")
    ap.add_argument("--symmetric", action="store_true", help="int4 symmetric (default asymmetric)")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--calib", default=None, help="GPTQ calibration text file (.txt, .gz, .jsonl, folder)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--embed-bits", type=int, default=None, help="8: keep embeddings and lm_head at int8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.group_size is not None and args.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {args.group_size}")
    check_writable(args.out, "dir")
    from phiforge import load

    model, tok = load(args.model, dtype="float32")
    calib = None
    if args.method == "gptq" and args.bits == 4:
        if not args.calib:
            raise UserError("--method gptq needs --calib FILE (text to calibrate on)")
        if tok is None:
            raise UserError(f"{args.model} has no tokenizer; GPTQ calibration needs one")
        calib = calibration_ids(tok, args.calib, args.calib_samples, args.seq_len)
    group_size = args.group_size
    if group_size is None and args.bits == 4:
        group_size = default_group_size(model)
        if group_size != DEFAULT_GROUP_SIZE:
            print(f"quantize: group size {group_size}: the default {DEFAULT_GROUP_SIZE} does not divide every "
                  "in_features of this model", file=sys.stderr)
    how = (f"group {group_size}, {'symmetric' if args.symmetric else 'asymmetric'}, {args.method}" if args.bits == 4
           else "symmetric per output channel, rtn")
    print(f"quantizing {args.model}: {args.bits}-bit, {how}", file=sys.stderr)
    quantize(model.eval(), args.bits, group_size, args.symmetric, args.method, calib, args.embed_bits)
    save_quantized(model, args.out, tok)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
