"""The quantized formats: round-to-nearest int8 / int4 primitives, int4 packing and the kernel's tiled layout, and the
modules that replace nn.Linear / nn.Embedding (Int8Linear, Int8Embedding, Int4Linear). See phiforge/quant/__init__.py
for the formats' definition and docs/quant.md for their speed."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.utils import UserError

# The int4 group sizes `phiforge quantize` offers: the ones aten's int4 kernel takes and our kernel compiles in.
# (Int4Linear itself accepts any multiple of 32, e.g. from a checkpoint made elsewhere.)
GROUP_SIZES = (32, 64, 128, 256)


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
    aten._weight_int4pack_mm_for_cpu, else dequantize + F.linear. All three compute x @ dequantize_int4(...)^T.

    The module holds its weights in our kernel's layout from the moment it is built (`tile_int4`: `qweight`
    [Np, K/2] in 4-row tiles, Np = N rounded up to 4, and `sm` [Np/4, K/G, 8] holding each tile's scales and
    offsets), so a forward never converts anything and its state_dict is that layout. The row layout of
    `pack_int4` with separate `scales` / `offsets` [N, K/G] is the file format: `file_tensors` gives it and
    `from_file_tensors` reads it (save_quantized / load_quantized convert there, once); `rows_qweight()`,
    `scales` and `offsets` read it back from the tiles."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        if in_features % group_size or group_size % 32:
            raise UserError(f"int4 needs in_features ({in_features}) divisible by group_size ({group_size}), "
                            "and group_size a multiple of 32")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        ng, n_pad = in_features // group_size, out_features + -out_features % 4
        self.register_buffer("qweight", torch.zeros(n_pad, in_features // 2, dtype=torch.uint8))
        sm = torch.zeros(n_pad // 4, ng, 8, dtype=torch.float16)
        sm[..., :4] = 1.0  # scales 1, offsets 0
        self.register_buffer("sm", sm)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.backend = "auto"  # "ours" | "torch" | "dequant"; auto picks the fastest available
        self._torch_packed = None  # aten's own packing, made on first use of the "torch" fallback
        self.compute_dtype = torch.float32

    @classmethod
    def from_codes(cls, codes, scales, offsets, group_size: int, bias=None) -> "Int4Linear":
        N, K = codes.shape
        mod = cls(K, N, group_size, bias=bias is not None)
        mod.qweight, mod.sm = tile_int4(pack_int4(codes), scales.half(), offsets.half())
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().float().clone())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        codes, s, m = quantize_int4(linear.weight.detach(), group_size, symmetric)
        mod = cls.from_codes(codes, s, m, group_size, linear.bias)
        mod.compute_dtype = linear.weight.dtype
        return mod

    # -- the file format (row layout) --------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """{"qweight": [N, K/2] packed rows, "scales", "offsets": fp16 [N, K/G]}: what checkpoints store."""
        return {"qweight": self.rows_qweight(), "scales": self.scales, "offsets": self.offsets}

    def file_shapes(self) -> dict[str, tuple]:
        ng = self.in_features // self.group_size
        return {"qweight": (self.out_features, self.in_features // 2), "scales": (self.out_features, ng),
                "offsets": (self.out_features, ng)}

    def from_file_tensors(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
        """Take weights in the file format (row layout), tiling them once."""
        want = self.file_shapes()
        for name, t in (("qweight", qweight), ("scales", scales), ("offsets", offsets)):
            if tuple(t.shape) != want[name]:
                raise UserError(f"int4 {name} has shape {tuple(t.shape)}, expected {want[name]}")
        self.qweight, self.sm = tile_int4(qweight.to(torch.uint8), scales.half(), offsets.half())
        self._torch_packed = None

    def rows_qweight(self) -> torch.Tensor:
        """qweight in the row layout of `pack_int4`."""
        return untile_int4(self.qweight)[: self.out_features]

    @property
    def scales(self) -> torch.Tensor:
        """fp16 [N, K/G] (a copy read from the tiles)."""
        return self.sm[..., :4].transpose(1, 2).reshape(-1, self.sm.shape[1])[: self.out_features].contiguous()

    @property
    def offsets(self) -> torch.Tensor:
        return self.sm[..., 4:].transpose(1, 2).reshape(-1, self.sm.shape[1])[: self.out_features].contiguous()

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.rows_qweight()), self.scales, self.offsets)

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
            sm = self.sm if self.sm.dtype == torch.float16 else self.sm.half()  # after a model-wide .to(dtype)
            y = _kernel()(x2.float().contiguous(), self.qweight, sm, self.group_size)
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


def empty_module(spec: dict, old: nn.Module) -> nn.Module:
    """The module a quant_config spec ({"kind": int4|int8|int8_embedding, ...}) puts in place of `old`, unfilled."""
    if spec["kind"] == "int4":
        return Int4Linear(old.in_features, old.out_features, spec["group_size"], bias=old.bias is not None)
    if spec["kind"] == "int8":
        return Int8Linear(old.in_features, old.out_features, bias=old.bias is not None)
    return Int8Embedding(old.num_embeddings, old.embedding_dim, dtype=old.weight.dtype)


def rtn_module(spec: dict, old: nn.Module, symmetric: bool) -> nn.Module:
    """`old` quantized round-to-nearest per its spec."""
    if spec["kind"] == "int4":
        return Int4Linear.from_linear(old, spec["group_size"], symmetric)
    if spec["kind"] == "int8":
        return Int8Linear.from_linear(old)
    return Int8Embedding.from_embedding(old)
