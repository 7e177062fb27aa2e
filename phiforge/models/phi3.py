"""The dense Phi-3 family (phi-3-mini 4k/128k, phi-3-medium, phi-3.5-mini, phi-4-mini) in one file.

References (read, not copied):
  * transformers src/transformers/models/phi3/modular_phi3.py @ 06053b84 (block, fused qkv / gate_up)
  * transformers src/transformers/modeling_rope_utils.py @ 0044e3b3 (_compute_longrope_parameters)
  * ../shared/docs/PHI3_SPEC.md sections 1-3, 7, 8 (sliding window semantics, LongRoPE, partial rotary)

Notation: B batch, T query length, S key length (cache slots), C hidden size, nh query heads,
nkv key/value heads, hs head size, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.models.cache import KVCache, build_mask
from phiforge.models.loss import lm_head_loss
from phiforge.utils import UserError


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Phi3Config:
    model_type: ClassVar[str] = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> MHA
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # phi-4-mini: 0.75 (rotate the first 96 of 128 dims)
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    # None, or {"type": "longrope", "short_factor": [...], "long_factor": [...]} ("su" is the same thing).
    rope_scaling: dict | None = None
    # Trained semantics (PHI3_SPEC 2.2): a query at q attends to keys q - sliding_window ... q, i.e.
    # sliding_window + 1 keys including itself. None = full causal attention.
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = 32000
    initializer_range: float = 0.02
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("su", "longrope"):
                raise UserError(f"unknown rope_scaling type {kind!r}: phiforge supports 'longrope' (alias 'su') "
                                "or rope_scaling: null")
            for key in ("short_factor", "long_factor"):
                n = len(self.rope_scaling.get(key) or [])
                if n != self.rotary_dim // 2:
                    raise UserError(f"rope_scaling.{key} has {n} entries; it must have rotary_dim/2 = "
                                    f"{self.rotary_dim // 2}")
            self.rope_scaling = {"type": "longrope", "short_factor": list(self.rope_scaling["short_factor"]),
                                 "long_factor": list(self.rope_scaling["long_factor"])}

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict) -> "Phi3Config":
        """Read a released Hugging Face config.json (dict)."""
        model_type = hf.get("model_type", "phi3")
        if model_type != "phi3":
            raise UserError(f"model_type {model_type!r} is not the dense 'phi3' family this file reads")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise UserError(f"the config lacks {', '.join(missing)}")
        scaling = hf.get("rope_scaling")
        if scaling is None and isinstance(hf.get("rope_parameters"), dict):  # transformers 5 spelling
            rp = hf["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                scaling = rp
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hidden // heads):
            raise UserError(f"head_dim {hf['head_dim']} != hidden_size/num_attention_heads; not a Phi-3 layout")
        rp = hf.get("rope_parameters") or {}
        eos = hf.get("eos_token_id", 32000)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", rp.get("rope_theta", 10000.0)),
            partial_rotary_factor=hf.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)) or 1.0,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            original_max_position_embeddings=hf.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 4096),
            rope_scaling=scaling, sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict:
        """A config.json that transformers' Phi3ForCausalLM (4.45+ and 5.x) loads with identical semantics."""
        return {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rope_scaling": self.rope_scaling, "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range, "attention_bias": False, "attention_dropout": 0.0,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "use_cache": True, "torch_dtype": "float32",
        }

    def num_params(self) -> int:
        C, F_, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        qkv = C * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        per_layer = qkv + self.num_attention_heads * self.head_dim * C + 2 * F_ * C + F_ * C + 2 * C
        return V * C * (1 if self.tie_word_embeddings else 2) + L * per_layer + C


def _factors(n: int, lo: float, hi: float) -> list[float]:
    """Monotone per-dimension LongRoPE factors for tiny test presets (real models read theirs from config.json)."""
    return [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]


_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32)
_MEDIUM = dict(vocab_size=32064, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
               num_attention_heads=40, num_key_value_heads=10)
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
             eos_token_id=2, bos_token_id=1, pad_token_id=0)

# Full-size presets carry the dimensions; the LongRoPE factor arrays of released models are read from their
# config.json (from_hf). The 128k presets use neutral factors so that they build without a download.
PRESETS: dict[str, dict] = {
    "phi-3-mini-4k": dict(_MINI, sliding_window=2047),
    "phi-3-mini-128k": dict(_MINI, max_position_embeddings=131072, sliding_window=262144,
                            rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                          "long_factor": _factors(48, 1.0, 64.0)}),
    "phi-3-medium-4k": dict(_MEDIUM, sliding_window=2047),
    "phi-3-medium-128k": dict(_MEDIUM, max_position_embeddings=131072, sliding_window=131072,
                              rope_scaling={"type": "longrope", "short_factor": [1.0] * 64,
                                            "long_factor": _factors(64, 1.0, 64.0)}),
    "phi-3.5-mini": dict(_MINI, max_position_embeddings=131072, sliding_window=262144,
                         rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                       "long_factor": _factors(48, 1.0, 64.0)}),
    "phi-4-mini": dict(vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                       max_position_embeddings=131072, tie_word_embeddings=True, sliding_window=262144,
                       bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                     "long_factor": _factors(48, 1.0, 47.77)}),
    # tiny presets: tests and CPU training
    "tiny": dict(_TINY),
    "tiny-4k": dict(_TINY, sliding_window=15),
    "tiny-128k": dict(_TINY, max_position_embeddings=1024, original_max_position_embeddings=32,
                      rope_scaling={"type": "longrope", "short_factor": _factors(8, 1.0, 1.5),
                                    "long_factor": _factors(8, 1.0, 8.0)}),
    "tiny-gqa": dict(_TINY, num_attention_heads=8, num_key_value_heads=2, hidden_size=128, intermediate_size=256),
    "tiny-phi4": dict(_TINY, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                      tie_word_embeddings=True, max_position_embeddings=1024, original_max_position_embeddings=32,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * 6,
                                    "long_factor": _factors(6, 1.0, 6.0)}),
    # ~20M parameters: benchmarks and the laptop-scale recipe
    "small-20m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
                      original_max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


# ----------------------------------------------------------------------------------------------------------------
# Leaf modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back before the weight multiply (Llama/Mistral order; PHI3_SPEC 2.2).
        # F.rms_norm is the same x * rsqrt(mean(x^2) + eps) as one fused op.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE with optional LongRoPE. Angles and cos/sin are computed in fp32 from positions on each call
    (cheap next to attention), so no table can go stale or be built in bf16 (PHI3_SPEC 3.1, candle #3698)."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.original_max = cfg.original_max_position_embeddings
        d = cfg.rotary_dim
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
        self.long_rope_capable = cfg.rope_scaling is not None
        if cfg.rope_scaling is None:
            short, long_, self.mscale = base, base, 1.0
        else:
            short = base / torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float32)
            long_ = base / torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float32)
            s = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            # mscale multiplies cos and sin in BOTH regimes (HF attention_factor; PHI3_SPEC 3.2).
            self.mscale = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(cfg.original_max_position_embeddings))
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long_, persistent=False)

    def use_long(self, positions: torch.Tensor) -> bool:
        """transformers' rule: one factor set per call, long iff max(position) + 1 > original_max."""
        return self.long_rope_capable and int(positions.max()) + 1 > self.original_max

    def forward(self, positions: torch.Tensor, long_rope: bool | None = None):
        if long_rope is None:
            long_rope = self.use_long(positions)
        inv_freq = self.inv_freq_long if long_rope else self.inv_freq_short
        angles = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, rd/2)
        emb = torch.cat((angles, angles), dim=-1)  # (B, T, rd)
        return emb.cos() * self.mscale, emb.sin() * self.mscale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos/sin (B, T, rd). Rotates the first rd dims (rotate_half style), passes the rest."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot = x[..., :rd]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)  # partial rotary: pass the rest


# ----------------------------------------------------------------------------------------------------------------
# Attention, MLP, block


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Fused projection, contiguous [q | k | v] blocks (not interleaved), no bias (PHI3_SPEC 2.1).
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache_layer=None, cache_slots=None, is_causal=False):
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_layer is not None:
            k, v = cache_layer.update(cache_slots, k, v)  # (B, nkv, S, hs)
        # kv head j serves query heads j*G ... j*G+G-1 (repeat_interleave semantics), like HF repeat_kv.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # first half is the gate (PHI3_SPEC 2.2)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_layer=None, cache_slots=None, is_causal=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_layer, cache_slots, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Body(nn.Module):
    """Holds the `model.*` parameters so that state-dict names equal the HF checkpoint's."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# The model


class Phi3(nn.Module):
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.config = cfg
        self.model = Phi3Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def init_weights(self, seed: int | None = None) -> None:
        """The one init function: every matrix N(0, 0.02); residual output projections (o_proj, down_proj)
        scaled by 1/sqrt(2 * n_layers) as in GPT-2; norms at 1."""
        device = self.model.norm.weight.device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            self.model.embed_tokens.weight.normal_(0.0, std, generator=gen)
            for block in self.model.layers:
                block.self_attn.qkv_proj.weight.normal_(0.0, std, generator=gen)
                block.self_attn.o_proj.weight.normal_(0.0, out_std, generator=gen)
                block.mlp.gate_up_proj.weight.normal_(0.0, std, generator=gen)
                block.mlp.down_proj.weight.normal_(0.0, out_std, generator=gen)
                block.input_layernorm.weight.fill_(1.0)
                block.post_attention_layernorm.weight.fill_(1.0)
            self.model.norm.weight.fill_(1.0)
            if not self.config.tie_word_embeddings:
                self.lm_head.weight.normal_(0.0, std, generator=gen)

    # -- the model contract (phiforge/models/__init__.py) -------------------------------------------------------
    @property
    def embed(self) -> nn.Module:
        return self.model.embed_tokens

    @property
    def head(self) -> nn.Module:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # not lm_head: a quantized head has no plain weight tensor

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent tables (rotary) on the weights' device: after a meta-device build."""
        self.rotary = RotaryEmbedding(self.config).to(self.device)

    def make_cache(self, batch: int, slots: int, dtype=None, device=None) -> KVCache:
        p = self.model.norm.weight
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_slots: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                long_rope: bool | None = None, return_hidden: bool = False, targets: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with `targets` (B, T, already shifted) -> the mean cross-entropy
        over targets != ignore_index, the LM head fused into the loss (no (B, T, V) logits; models/loss.py)."""
        B, T = input_ids.shape
        implicit = positions is None  # 0..T-1 for every row: causal without inspecting the tensor (no graph break)
        if implicit:
            positions = torch.arange(T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, T)
        cos, sin = self.rotary(positions, long_rope)  # (B, T, rd)

        is_causal = False
        if cache is not None:
            if cache_slots is None:
                raise ValueError("cache_slots is required with a cache")
            cache.pos[:, cache_slots] = positions
            mask = attn_mask if attn_mask is not None else build_mask(positions, cache.pos, self.config.sliding_window)
        elif attn_mask is not None:
            mask = attn_mask
        else:
            window = self.config.sliding_window
            plain = implicit or (bool((positions[0] == torch.arange(T, device=positions.device)).all()) and
                                 (B == 1 or bool((positions == positions[:1]).all())))
            if plain and (window is None or window >= T - 1):
                is_causal, mask = True, None  # fast path: ordinary causal attention
            else:
                mask = build_mask(positions, positions, window)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for i, block in enumerate(self.model.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, layer_cache, cache_slots, is_causal,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, layer_cache, cache_slots, is_causal)
        x = self.model.norm(x)
        if return_hidden:
            return x
        if targets is not None:
            return lm_head_loss(self.lm_head, x, targets, ignore_index)  # no (B, T, V) logits held (loss.py)
        return self.lm_head(x)  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# The names the model contract asks for (phiforge/models/__init__.py).
ModelConfig, Model = Phi3Config, Phi3
