"""The static KV cache every model file's `make_cache` returns, and the position-derived attention mask.

The engine (generate.py, batch.py) views, compacts and reuses rows and slots of this one layout, so a model
family with attention keeps its keys/values here: `pos` (B, S) holds the RoPE position of each slot (-1 = empty),
`layers[i].k/.v` (B, nkv, S, hs). The model writes `pos[:, cache_slots] = positions` in its forward and attends to
every slot, masked by `build_mask`. Any object with `.pos` and `.layers[i].update(slots, k, v)` works in its place
(step.CacheView passes row/slot views).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class KVCacheLayer(nn.Module):
    """Static per-layer cache: keys/values (B, nkv, S, hs) plus the RoPE position held in each slot (-1 = empty)."""

    def __init__(self, batch: int, slots: int, n_kv: int, head_dim: int, dtype, device, pos: torch.Tensor):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, slots, head_dim, dtype=dtype, device=device), persistent=False)
        self.pos = pos  # shared (B, S) tensor owned by KVCache

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class KVCache(nn.Module):
    """Preallocated cache for all layers. `pos[b, s]` is the RoPE position stored in slot s (-1 = empty/padding);
    the attention mask is derived from it, so left padding, ring buffers and chunked prefill stay exact."""

    def __init__(self, n_layers: int, batch: int, slots: int, n_kv: int, head_dim: int, dtype=torch.float32,
                 device="cpu"):
        super().__init__()
        self.register_buffer("pos", torch.full((batch, slots), -1, dtype=torch.long, device=device), persistent=False)
        self.layers = nn.ModuleList(KVCacheLayer(batch, slots, n_kv, head_dim, dtype, device, self.pos)
                                    for _ in range(n_layers))

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers) + self.pos.nbytes

    def reset(self) -> None:
        self.pos.fill_(-1)


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos (B, T), k_pos (B, S) -> bool (B, 1, T, S): key visible iff 0 <= k <= q and q - k <= window."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) <= window
    # A padding query (position -1) sees everything: its output is discarded, but an all-masked row would make
    # NaNs that later leak through 0 * NaN in attention over its (masked) key.
    return mask | (q < 0)
