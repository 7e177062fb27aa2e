"""Phi-3.5-MoE (`PhiMoEForCausalLM`, model_type "phimoe"): the Phi-3 decoder with LayerNorm, biased attention and
a sparse mixture of SwiGLU experts routed top-2 by SparseMixer-v2.

References (read, not copied):
  * transformers src/transformers/models/phimoe/modular_phimoe.py (5.x as installed; PHI3_SPEC reads it
    @ 0233e509): sparsemixer, PhimoeRotaryEmbedding (explicit short/long mscale), LayerNorm block
  * SparseMixer-v2: Liu et al., "GRIN: GRadient-INformed MoE", arXiv 2409.12136
  * transformers models/phimoe/modeling_phimoe.py: sparsemixer (training=True/False), PhimoeMultiplier,
    PhimoeSparseMoeBlock's input jitter (the training router here draws the same random numbers in the same order)
  * ../shared/docs/PHI3_SPEC.md sections 3.2 (LongRoPE, MoE mscales) and 5 (tensors, router inference path)

Notation: B batch, T query length, S key length (cache slots), C hidden size, nh query heads, nkv key/value heads,
hs head size, V vocab, N tokens (B*T), E experts, F expert FFN size.

The forward, the cache and the mask are the dense Phi-3 model's (phi3.py): PhiMoE inherits them and differs only
in what a block holds. State-dict names are the Hub checkpoint's (PHI3_SPEC 5.1: `block_sparse_moe.gate`,
`block_sparse_moe.experts.{e}.w1/w2/w3`), not transformers 5's fused `mlp.experts.gate_up_proj` layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.models import phi3
from phiforge.models.phi3 import apply_rotary
from phiforge.utils import UserError


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PhiMoEConfig:
    model_type: ClassVar[str] = "phimoe"
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8  # None -> MHA
    num_local_experts: int = 16
    num_experts_per_tok: int = 2  # SparseMixer-v2 as released is top-2 only
    rms_norm_eps: float = 1e-5  # the LayerNorm eps, under the name the config.json uses
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    # None, or {"type": "longrope", "short_factor", "long_factor", "short_mscale", "long_mscale"} (PHI3_SPEC 3.2)
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # same semantics as phi3.py: keys q - sliding_window ... q
    attention_bias: bool = True
    lm_head_bias: bool = True
    router_jitter_noise: float = 0.01  # SparseMixer's eps: the 2*eps relative band around each step's max logit
    input_jitter_noise: float = 0.01  # training only: the MoE input times uniform(1 - j, 1 + j) noise
    # training only, not in config.json: False routes as at inference (deterministic top-2, gradients through the
    # band softmax only) instead of SparseMixer-v2's sampling; for ablations and rank-count-independent tests
    router_sampling: bool = True
    router_aux_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)  # phi3.RotaryEmbedding reads it; PhiMoE rotates every dim

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if self.num_experts_per_tok != 2:
            raise UserError(f"num_experts_per_tok is {self.num_experts_per_tok}: PhiMoE's SparseMixer-v2 router "
                            "picks exactly 2 experts per token (PHI3_SPEC 5.2); set num_experts_per_tok: 2")
        if not 2 <= self.num_local_experts:
            raise UserError(f"num_local_experts is {self.num_local_experts}; top-2 routing needs at least 2")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = self.head_dim
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("su", "longrope"):
                raise UserError(f"unknown rope_scaling type {kind!r}: phimoe supports 'longrope' (alias 'su') "
                                "or rope_scaling: null")
            for key in ("short_factor", "long_factor"):
                n = len(rs.get(key) or [])
                if n != self.rotary_dim // 2:
                    raise UserError(f"rope_scaling.{key} has {n} entries; it must have head_dim/2 = "
                                    f"{self.rotary_dim // 2}")
            # Phi-3.5-MoE ships both mscales (do not recompute: PHI3_SPEC 3.2); without them, Phi-3's formula.
            s = self.max_position_embeddings / self.original_max_position_embeddings
            default = 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))
            self.rope_scaling = {"type": "longrope", "short_factor": list(rs["short_factor"]),
                                 "long_factor": list(rs["long_factor"]),
                                 "short_mscale": float(rs.get("short_mscale") or default),
                                 "long_mscale": float(rs.get("long_mscale") or default)}

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict) -> "PhiMoEConfig":
        """Read a released Hugging Face config.json (dict), or one transformers 5 saved."""
        if hf.get("model_type") != "phimoe":
            raise UserError(f"model_type {hf.get('model_type')!r} is not the 'phimoe' family this file reads")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise UserError(f"the config lacks {', '.join(missing)}")
        rp = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
        scaling = hf.get("rope_scaling")
        if scaling is None and rp.get("rope_type", "default") != "default":  # transformers 5 spelling
            scaling = rp
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hidden // heads):
            raise UserError(f"head_dim {hf['head_dim']} != hidden_size/num_attention_heads; not a PhiMoE layout")
        orig = (hf.get("original_max_position_embeddings") or (scaling or {}).get("original_max_position_embeddings")
                or hf.get("max_position_embeddings", 4096 * 32))
        eos = hf.get("eos_token_id", 32000)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            num_local_experts=hf.get("num_local_experts", 16), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", rp.get("rope_theta", 1e6)),  # 1e6: transformers' and Microsoft's default
            max_position_embeddings=hf.get("max_position_embeddings", 4096 * 32),
            original_max_position_embeddings=orig, rope_scaling=scaling, sliding_window=hf.get("sliding_window"),
            attention_bias=hf.get("attention_bias", False), lm_head_bias=hf.get("lm_head_bias", False),
            router_jitter_noise=hf.get("router_jitter_noise", 0.01),
            input_jitter_noise=hf.get("input_jitter_noise", 0.0),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict:
        """A config.json in the released layout (legacy `rope_scaling`), which transformers 5 also reads."""
        scaling = None if self.rope_scaling is None else {
            **self.rope_scaling, "original_max_position_embeddings": self.original_max_position_embeddings}
        return {
            "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rope_scaling": scaling, "sliding_window": self.sliding_window,
            "attention_bias": self.attention_bias, "lm_head_bias": self.lm_head_bias,
            "router_jitter_noise": self.router_jitter_noise, "input_jitter_noise": self.input_jitter_noise,
            "router_aux_loss_coef": self.router_aux_loss_coef, "output_router_logits": False,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "use_cache": True, "torch_dtype": "float32",
        }

    def num_params(self) -> int:
        """All parameters (every expert); about 42B for phi-3.5-moe, of which ~6.6B are active per token."""
        C, F_, L, V, E = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size, \
            self.num_local_experts
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = C * (q + 2 * kv) + q * C + (q + 2 * kv + C if self.attention_bias else 0)
        per_layer = attn + E * C + E * 3 * C * F_ + 4 * C  # router, experts, two LayerNorms (weight + bias)
        head = (0 if self.tie_word_embeddings else V * C) + (V if self.lm_head_bias else 0)
        return V * C + head + L * per_layer + 2 * C


def _factors(n: int, lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]


# Full-size dims from the released config.json (../shared/reference/phi3/Phi-3.5-MoE-instruct); its 64-entry factor
# arrays are read from the checkpoint's config.json (from_hf), the preset carries neutral ones to build offline.
PRESETS: dict[str, dict] = {
    "phi-3.5-moe": dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
                        max_position_embeddings=131072, original_max_position_embeddings=4096,
                        sliding_window=131072, bos_token_id=1, eos_token_id=32000,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 64,
                                      "long_factor": _factors(64, 1.0, 64.0),
                                      "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122}),
    # tests and CPU: GQA 4 over 2, 4 experts, top-2
    "tiny-moe": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     max_position_embeddings=256, original_max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


# ----------------------------------------------------------------------------------------------------------------
# Leaf modules


class RotaryEmbedding(phi3.RotaryEmbedding):
    """Phi-3's LongRoPE with PhiMoE's explicit per-regime mscale (rope_scaling.short_mscale / long_mscale) in place
    of the computed one. The regime rule is transformers': long iff max(position) + 1 > original_max."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__(cfg)
        rs = cfg.rope_scaling or {"short_mscale": 1.0, "long_mscale": 1.0}
        self.mscale = 1.0  # the parent's multiply becomes exact; the regime's mscale is applied below
        self.short_mscale, self.long_mscale = rs["short_mscale"], rs["long_mscale"]

    def forward(self, positions: torch.Tensor, long_rope: bool | None = None):
        if long_rope is None:
            long_rope = self.use_long(positions)
        cos, sin = super().forward(positions, long_rope)  # (B, T, hs) each
        m = self.long_mscale if long_rope else self.short_mscale
        return cos * m, sin * m


# ----------------------------------------------------------------------------------------------------------------
# Attention, experts, router, block


class Attention(nn.Module):
    """Llama GQA attention with separate, biased q/k/v/o projections (PHI3_SPEC 5.1: not fused in this family)."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=bias)

    def forward(self, x, cos, sin, mask, cache_layer=None, cache_slots=None, is_causal=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_layer is not None:
            k, v = cache_layer.update(cache_slots, k, v)  # (B, nkv, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class Expert(nn.Module):
    """One SwiGLU expert, Mixtral names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def sparsemixer_top2(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer-v2's inference routing (PHI3_SPEC 5.2). logits (N, E) -> weights (N, 2), experts (N, 2).

    Each pick is the argmax of what is left; its weight is the softmax over only the ORIGINAL logits within a
    relative band of 2*eps below that pick's logit, read at the pick. The two weights are not renormalised: with
    a clear winner both are ~1, so the output is ~E_1(x) + E_2(x)."""
    top1, i1 = logits.max(dim=-1, keepdim=True)  # (N, 1)
    far = (top1 - logits) / logits.abs().clamp(min=top1) > 2 * eps  # (N, E): outside the band
    w1 = logits.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, i1)
    rest = logits.scatter(-1, i1, float("-inf"))  # the first pick removed
    top2, i2 = rest.max(dim=-1, keepdim=True)
    far = (top2 - logits) / logits.abs().clamp(min=top2) > 2 * eps  # band around the second pick, original logits
    w2 = rest.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, i2)
    return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)


class HeunMultiplier(torch.autograd.Function):
    """The gate weight of one sampled expert, with SparseMixer-v2's gradient (GRIN, arXiv 2409.12136, section 3).

    Sampling an expert is not differentiable. The forward value is the picked expert's band-softmax probability
    p_k times `scale` (1, or ~1/3, drawn in _sample_one); the backward is the derivative of the UNSCALED p_k with
    respect to every logit, d p_k / d l_j = p_k (1[j=k] - p_j), whatever the scale. The pair (scaled forward,
    unscaled backward) is the released code's `PhimoeMultiplier`, its Heun third-order estimate of the routing
    gradient (after SparseMixer, Liu et al. 2023)."""

    @staticmethod
    def forward(ctx, logits, p_pick, pick, probs, scale):
        # logits (N, E) only receives the gradient; p_pick (N, 1), pick (N, 1), probs (N, E), scale (N, 1)
        ctx.save_for_backward(p_pick, pick, probs)
        return p_pick * scale

    @staticmethod
    def backward(ctx, grad):
        p_pick, pick, probs = ctx.saved_tensors
        g = grad * p_pick  # (N, 1)
        grad_logits = -probs * g  # -p_k p_j for every j ...
        grad_logits.scatter_add_(-1, pick, g)  # ... + p_k at j = k
        return grad_logits, None, None, None, None


def _sample_one(logits, left, eps, generator, heun_draws=1):
    """One SparseMixer-v2 training pick. logits (N, E): the router's, which receive the gradient and against which
    the band is measured (as at inference); left (N, E): logits with the experts already picked at -inf.
    Returns the weight (N, 1), differentiable through HeunMultiplier, and the pick (N, 1)."""
    with torch.no_grad():
        top = left.max(dim=-1, keepdim=True).values
        far = (top - logits) / logits.abs().clamp(min=top) > 2 * eps  # outside the 2*eps band below the max
        banded = left.masked_fill(far, float("-inf"))
        # Gumbel-max: argmax(l - log(Exp(1))) is a sample from softmax(l) restricted to the band
        exp1 = torch.empty_like(banded).exponential_(generator=generator)
        pick = (banded - exp1.log()).max(dim=-1).indices.unsqueeze(-1)
        probs = banded.softmax(dim=-1)
        p_pick = probs.gather(-1, pick)
        # Heun's third-order step: a pick that is not the band's argmax keeps its full weight with probability 1/4,
        # else 1/3 of it. The released code draws the second pick's uniform twice (rand_like(..).uniform_()), hence
        # heun_draws; 0.3333 / 0.6667 are its constants too: one seed, bit-equal weights.
        u = torch.empty_like(p_pick)
        for _ in range(heun_draws):
            u.uniform_(generator=generator)
        keep = (pick == probs.max(dim=-1, keepdim=True).indices) | (u > 0.75)
        scale = torch.add(0.3333, keep, alpha=0.6667).type_as(probs)
    return HeunMultiplier.apply(logits, p_pick, pick, probs, scale), pick


def sparsemixer_train(logits: torch.Tensor, eps: float, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer-v2's training routing (GRIN, arXiv 2409.12136). logits (N, E) -> weights (N, 2), experts (N, 2).

    Like sparsemixer_top2, but each pick is SAMPLED from its band softmax (Gumbel-max) instead of taken as the
    argmax, and its weight's gradient is Heun's estimate (HeunMultiplier). The second pick is sampled among the
    experts left, its band measured against the original logits. Random numbers come from `generator` (None:
    torch's global RNG, which activation checkpointing replays and training checkpoints save), drawn with the
    released code's calls and order, so that one seed gives its routing: Exp(1) (N, E), U(0,1) (N, 1) for the
    first pick, Exp(1) (N, E), U(0,1) (N, 1) twice for the second."""
    w1, i1 = _sample_one(logits, logits, eps, generator)
    w2, i2 = _sample_one(logits, logits.detach().scatter(-1, i1, float("-inf")), eps, generator, heun_draws=2)
    return torch.cat((w1, w2), dim=-1), torch.cat((i1, i2), dim=-1)


class SparseMoE(nn.Module):
    """Router `gate` (no bias) + E experts; each token runs through its 2 experts, outputs weighted and summed.

    Inference (eval mode) routes with sparsemixer_top2. Training routes with sparsemixer_train (sampled picks,
    Heun's gradient) after multiplying the input by uniform(1 - j, 1 + j) noise, j = input_jitter_noise; the
    experts see the jittered input too, as in the released code. (transformers 5 jitters twice, in the block and
    again in its router; tests/test_phimoe_router.py compares with its router's jitter off.) Random numbers come
    from `generator` (None: torch's global RNG).

    `routed` counts the tokens routed to each expert in training forwards since the model's pop_expert_load()."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.eps, self.jitter, self.sampling = cfg.router_jitter_noise, cfg.input_jitter_noise, cfg.router_sampling
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))
        self.generator: torch.Generator | None = None
        # a plain CPU tensor, not a buffer: DDP would broadcast rank 0's buffer over each rank's own counts
        self.routed = torch.zeros(cfg.num_local_experts, dtype=torch.long, device="cpu")  # not meta at a meta build

    def forward(self, x):
        B, T, C = x.shape
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter, generator=self.generator)
        x = x.reshape(B * T, C)  # (N, C)
        if self.training and self.sampling:
            weights, experts = sparsemixer_train(self.gate(x), self.eps, self.generator)  # (N, 2) each
        else:
            weights, experts = sparsemixer_top2(self.gate(x), self.eps)
        return self._dispatch(x, weights, experts).view(B, T, C)

    # Eager even inside a torch.compile'd decode step: which experts run is data (the .tolist() below), so dynamo
    # would guard on the split sizes and recompile for each new combination of experts, up to its limit, after
    # which the whole step ran eager anyway; disabled, the compiled graph just breaks around the dispatch.
    @torch.compiler.disable
    def _dispatch(self, x, weights, experts):
        if x.shape[0] == 1 and not self.training:  # one token (a batch-1 decode step): its two experts directly,
            # nothing to group; the same products and the same two-term sum as below, in a third of the small ops
            (e1, e2), w = experts[0].tolist(), weights[0].to(x.dtype)
            return self.experts[e1](x) * w[0] + self.experts[e2](x) * w[1]
        # Group the N*2 (token, expert) pairs by expert, so each expert runs once on all of its tokens.
        flat = experts.reshape(-1)  # (N*2,)
        order = flat.argsort(stable=True)
        token = order // 2  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        if self.training:
            self.routed += torch.tensor(counts)
        xs = x[token]  # (N*2, C) grouped by expert
        # In training every expert runs, an idle one on 0 tokens: its weights then get a zero gradient rather than
        # none, so DDP and FSDP2 reduce the same set of gradients on every rank whatever the routing. Inference
        # skips idle experts (decoding one token leaves E-2 of them idle in every layer).
        ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, xs.split(counts))
                        if self.training or len(chunk)])
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        # Back to (token, pick) order and the two picks summed: the same sum as index_add_ into zeros (a + b, one
        # rounding), but aten's CPU index_add_ (its parallel scatter_add) took 50-150 ms a call with 2 threads on
        # our shared 2-core machine, whatever N (10 us with 1 thread; torch 2.13): 97 % of a batch-1 decode step.
        unsorted = torch.empty_like(ys)
        unsorted[order] = ys
        return unsorted.view(-1, 2, ys.shape[-1]).sum(1)


class Block(nn.Module):
    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        # LayerNorm with weight and bias; its eps is the config's `rms_norm_eps` (PHI3_SPEC 1, 5.1).
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(cfg)

    def forward(self, x, cos, sin, mask, cache_layer=None, cache_slots=None, is_causal=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_layer, cache_slots, is_causal)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class PhiMoEBody(nn.Module):
    """Holds the `model.*` parameters so that state-dict names equal the Hub checkpoint's."""

    def __init__(self, cfg: PhiMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------------------
# The model


class PhiMoE(phi3.Phi3):
    """Phi3's forward, cache and contract properties over PhiMoE blocks (phi3.Phi3.forward: rotary, mask, blocks,
    final norm, head or fused loss). Only construction, init and the rotary differ."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention only: not the router, not 3*E experts
    # Quantization leaves the router in full precision: it is tiny (E x C, 0.001% of the weights) and its logits
    # pick the experts, where SparseMixer's 2*eps band makes a 1e-2 relative error enough to swap an expert or
    # change a weight from ~1 to ~0.5; an int4 step is ~5% of a group's range.
    keep_float = ("gate",)

    def __init__(self, cfg: PhiMoEConfig):
        nn.Module.__init__(self)  # not Phi3.__init__: the body differs
        self.config = cfg
        self.model = PhiMoEBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def init_weights(self, seed: int | None = None) -> None:
        """Every matrix N(0, 0.02); residual output projections (o_proj, each expert's w2) scaled by
        1/sqrt(2 * n_layers) as in GPT-2; biases 0; LayerNorms weight 1, bias 0."""
        device = self.model.norm.weight.device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        with torch.no_grad():
            self.model.embed_tokens.weight.normal_(0.0, std, generator=gen)
            for block in self.model.layers:
                att, moe = block.self_attn, block.block_sparse_moe
                for lin in (att.q_proj, att.k_proj, att.v_proj, moe.gate):
                    lin.weight.normal_(0.0, std, generator=gen)
                att.o_proj.weight.normal_(0.0, out_std, generator=gen)
                for expert in moe.experts:
                    expert.w1.weight.normal_(0.0, std, generator=gen)
                    expert.w3.weight.normal_(0.0, std, generator=gen)
                    expert.w2.weight.normal_(0.0, out_std, generator=gen)
                for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj):
                    if lin.bias is not None:
                        lin.bias.zero_()
                for norm in (block.input_layernorm, block.post_attention_layernorm):
                    norm.reset_parameters()
            self.model.norm.reset_parameters()
            if not self.config.tie_word_embeddings:
                self.lm_head.weight.normal_(0.0, std, generator=gen)
            if self.lm_head.bias is not None:
                self.lm_head.bias.zero_()

    def init_buffers(self) -> None:
        """(Re)compute the rotary tables on the weights' device: after a meta-device build."""
        self.rotary = RotaryEmbedding(self.config).to(self.device)

    def pop_expert_load(self) -> torch.Tensor:
        """(L, E) tokens routed to each expert of each layer by the training forwards since the last call, which
        resets them; the trainers log it (train/common.expert_load_record). Activation checkpointing runs each
        forward twice and so doubles every count; the fractions the trainers log are unchanged."""
        moes = [block.block_sparse_moe for block in self.model.layers]
        load = torch.stack([moe.routed for moe in moes])
        for moe in moes:
            moe.routed = torch.zeros_like(moe.routed)
        return load


# The names the model contract asks for (phiforge/models/__init__.py).
ModelConfig, Model = PhiMoEConfig, PhiMoE
