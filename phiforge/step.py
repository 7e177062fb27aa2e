"""One model call on a static KV cache, the step both engines are built of: the single stream (generate.py) and
continuous batching (batch.py).

    logits = prefill(model, ids (B, T), positions (B, T), cache, slot_start)    # fp32 (B, V) of the last token
    logits = decode_one_token(model, ids (B,), positions (B,), cache, slot)     # fp32 (B, V)

A `CacheView` is rows [r0, r1) and slots [0, n) of a models.cache.KVCache as views, so attention covers only the
slots in use; `compact_row` and `prefill_ring` keep a sliding-window model exact in a cache shorter than its
sequence; `compiled(model)` is the torch.compile'd decode step (one static shape per cache size).
"""
from __future__ import annotations

import torch

from phiforge.utils import UserError

DECODE_BUCKET = 64  # a decode step attends to slots [0, cursor + 1) rounded up to a multiple of this


class _LayerView:
    __slots__ = ("k", "v")

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class CacheView:
    """Rows [r0, r1) and slots [0, n) of a KVCache, as views: writes go to the cache, attention covers only the n
    slots in use (the model accepts any object with `.pos` and `.layers[i].update`)."""

    def __init__(self, cache, r0: int, r1: int, n: int):
        self.pos = cache.pos[r0:r1, :n]
        self.layers = [_LayerView(layer.k[r0:r1, :, :n], layer.v[r0:r1, :, :n]) for layer in cache.layers]


def prefill(model, input_ids: torch.Tensor, positions: torch.Tensor, cache, slot_start: int, chunk: int = 512,
            long_rope: bool | None = None, last_index: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts [B, T] (padding: position -1) through the model in chunks, writing slots slot_start.. of `cache`
    (a KVCache or CacheView). Returns fp32 logits [B, V] of the token at `last_index[b]` (default T-1)."""
    B, T = input_ids.shape
    if last_index is None:
        last_index = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    hidden = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        slots = torch.arange(slot_start + c0, slot_start + c1, device=input_ids.device)
        h = model(input_ids[:, c0:c1], positions[:, c0:c1], cache=cache, cache_slots=slots, long_rope=long_rope,
                  return_hidden=True)
        hidden.append(h)
    h = torch.cat(hidden, dim=1) if len(hidden) > 1 else hidden[0]
    last = h[torch.arange(B, device=h.device), last_index]  # (B, C)
    return model.head(last).float()


def decode_one_token(model, token_ids: torch.Tensor, positions: torch.Tensor, cache, slot: torch.Tensor,
                     long_rope: bool | None = None) -> torch.Tensor:
    """One token per row: token_ids [B] at positions [B] (-1 = idle row) into slot [1]. Returns fp32 logits [B, V]."""
    logits = model(token_ids[:, None], positions[:, None], cache=cache, cache_slots=slot, long_rope=long_rope)
    return logits[:, -1].float()


class CacheViews:
    """CacheViews of one cache, made once per (rows, slots) and reused: `views(r0, r1, n)` covers slots [0, n) with n
    rounded up to a multiple of `bucket` (at most the cache's length), so nearby lengths share one view."""

    def __init__(self, cache, max_len: int, bucket: int = DECODE_BUCKET):
        self.cache, self.max_len, self.bucket = cache, max_len, bucket
        self._views: dict = {}

    def __call__(self, r0: int, r1: int, n: int) -> CacheView:
        n = min(self.max_len, -(-n // self.bucket) * self.bucket)
        key = (r0, r1, n)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:
                self._views.clear()
            view = self._views[key] = CacheView(self.cache, r0, r1, n)
        return view

    def clear(self) -> None:
        self._views.clear()


def compact_row(cache, r: int, keep: torch.Tensor) -> int:
    """Move the slots of row r marked by `keep` [S] to the front of the row, in position order; every other slot
    becomes free (position -1). Returns how many were kept. Views stay valid (they alias the cache)."""
    pos = cache.pos
    idx = torch.nonzero(keep).squeeze(-1)
    idx = idx[torch.argsort(pos[r, idx])]
    n = idx.numel()
    for layer in cache.layers:
        layer.k[r, :, :n] = layer.k[r, :, idx]
        layer.v[r, :, :n] = layer.v[r, :, idx]
    pos[r, :n] = pos[r, idx].clone()
    pos[r, n:] = -1
    return n


def prefill_ring(model, view, pos_row: torch.Tensor, tokens: list[int], window: int, chunk: int,
                 long_rope: bool | None) -> torch.Tensor:
    """Sliding-window model, sequence longer than the cache row: prefill chunk by chunk into the row's free slots,
    evicting keys no later query can see (position < chunk start - window). Exact; the caller compacts the row
    after. view: the row's CacheView over all its slots; pos_row [S] its positions. Returns fp32 logits [V] of the
    last token."""
    n, device, h = len(tokens), pos_row.device, None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        pos_row.masked_fill_(pos_row < c0 - window, -1)
        free = torch.nonzero(pos_row < 0).squeeze(-1)[: c1 - c0]
        if free.numel() < c1 - c0:
            raise UserError(f"a cache of {pos_row.numel()} slots is too small for sliding window {window} "
                            f"plus prefill chunks of {chunk}; use max_len >= window + 1 + prefill_chunk")
        h = model(torch.tensor([tokens[c0:c1]], device=device), torch.arange(c0, c1, device=device)[None],
                  cache=view, cache_slots=free, long_rope=long_rope, return_hidden=True)
    return model.head(h[0, -1]).float()


_COMPILED: dict = {}


def compiled_cache_len(n: int) -> int:
    """Cache slots for a compiled decode step that must hold n tokens. The step has one static shape per cache size,
    so sizes are rounded up to a multiple of 256: requests of nearby lengths reuse one graph."""
    return -(-n // 256) * 256


def compiled(model):
    """torch.compile'd model for decode calls, built once per model (compiling takes a while)."""
    key = id(model)
    if key not in _COMPILED or _COMPILED[key][0] is not model:
        _COMPILED[key] = (model, torch.compile(model, dynamic=False))
    return _COMPILED[key][1]
