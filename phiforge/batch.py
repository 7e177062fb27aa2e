"""Continuous batching: `BatchState`, the mutable state of a batch of sequences sharing one preallocated KV cache.

    state = BatchState(model, tokenizer, max_batch=8, max_len=4096)
    seq = state.add(prompt_ids, GenerationConfig(max_new_tokens=128, temperature=0.7, seed=3), tag=request_id)
    while state.active():                     # add()/remove() may be called between any two steps
        for ev in state.step():               # ev.seq.tag tells which request; ev.text is the delta
            send(ev.seq.tag, ev.token_id, ev.text, ev.finish_reason)
    state.remove(seq)                         # cancel: frees its row now (finished rows are freed automatically)

Each sequence owns a cache *row*; all rows share a slot *cursor* (the slot the next decode step writes). The
attention mask comes from the positions stored per slot (models/cache.py), so rows of different lengths, gaps left by
padding, compaction and re-prefills are all exact. `step()` runs one engine step and returns `Event`s.

`add` raises `BatchFull` when all rows are busy; `state.free_rows()` says how many are left. A sequence added
between steps is prefilled at the next `step()` (pending rows are prefilled together, chunked by
`GenerationConfig.prefill_chunk`) while the other rows decode. When the shared cursor reaches the end of the cache,
the cache is compacted (each row's live slots move to the front, in position order); for sliding-window models the
keys that no future query can see (position < next - window) are evicted at the same time, so a windowed model runs
exactly with a cache of window + prefill-chunk slots. A sequence whose own length exceeds the cache ends with
finish_reason "length". Rows whose LongRoPE regimes differ in one step are run in separate model calls, so a batch
gives exactly the tokens of the sequences run one at a time (phiforge.generate's single-stream path).

The model calls and cache operations are phiforge.step's; sampling, stop handling and text are
phiforge.sample's. Used by the server's scheduler and by `generate.stream_generate` for a list of prompts.
"""
from __future__ import annotations

import time
from typing import Sequence as Seq

import torch

from phiforge.sample import Event, GenerationConfig, Sequence
from phiforge.step import CacheViews, compact_row, compiled, decode_one_token, prefill, prefill_ring
from phiforge.utils import UserError


class BatchFull(Exception):
    """All rows of the BatchState are in use."""


class BatchState:
    """Sequences sharing one static KVCache of `max_batch` rows x `max_len` slots. See the module docstring."""

    def __init__(self, model, tokenizer=None, max_batch: int = 1, max_len: int | None = None,
                 compile: bool = False, bucket: int = 64):
        cfg = model.config
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.device = model.device
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.cache = model.make_cache(max_batch, self.max_len)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.cursor = 0  # next slot a decode step writes (shared by all rows)
        self.views = CacheViews(self.cache, self.max_len, bucket)  # decode attends to [0, cursor+1) rounded up
        self.compiled = compile
        self._decode_model = compiled(model) if compile else model
        self.window = cfg.sliding_window

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    def active(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None]

    def add(self, prompt_ids: Seq[int], config: GenerationConfig | None = None, index: int = 0,
            tag: object = None) -> Sequence:
        """Queue a sequence; it is prefilled at the next step(). Raises BatchFull when no row is free."""
        seq = Sequence.start(prompt_ids, config, self.tok, self.cfg, self.device, row=-1, index=index, tag=tag,
                             n_decode_skip=1 if self.compiled else 0)
        if len(seq.prompt_ids) > self.max_len and self.window is None:
            raise UserError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the cache of {self.max_len} slots")
        try:
            seq.row = self.rows.index(None)
        except ValueError:
            raise BatchFull(f"all {len(self.rows)} rows are busy") from None
        self.rows[seq.row] = seq
        return seq

    def remove(self, seq: Sequence) -> None:
        """Free the row of `seq` (cancel it, or forget a finished one). Its cache row is reset."""
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self.cache.pos[seq.row].fill_(-1)
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"

    # -- cache management ------------------------------------------------------------------------------------------
    def compact(self) -> None:
        """Move each row's live slots to the front (in position order), evicting keys that no future query of a
        sliding-window model can see; the cursor becomes the largest live count."""
        pos = self.cache.pos
        top = 0
        for r, seq in enumerate(self.rows):
            keep = pos[r] >= 0
            if seq is None:
                keep[:] = False
            elif self.window is not None:
                keep &= pos[r] >= len(seq.tokens) - 1 - self.window
            top = max(top, compact_row(self.cache, r, keep))
        self.cursor = top
        self.views.clear()

    # -- one engine step -------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Prefill the sequences that need it, decode one token for every other live sequence, sample, and return one
        Event per sequence that produced a token. Finished sequences leave their rows."""
        with torch.inference_mode():
            pending, decoding = [], []
            for seq in self.active():
                need_long = seq.needs_long(self.cfg)
                if seq.n_cached == 0 or need_long != seq.long:
                    seq.long = need_long  # first prefill, or the LongRoPE switch: recompute the whole cache
                    pending.append(seq)
                else:
                    decoding.append(seq)
            logits: dict[int, torch.Tensor] = {}
            if decoding:
                self._decode(decoding, logits)
            if pending:
                self._prefill(pending, logits)
            return self._sample(logits)

    def _decode(self, seqs: list[Sequence], out: dict) -> None:
        if self.cursor >= self.max_len:
            self.compact()
        if self.cursor >= self.max_len:  # some sequences fill their rows on their own: they end here
            for seq in seqs:
                if int((self.cache.pos[seq.row] >= 0).sum()) >= self.max_len:
                    self._finish(seq, "length")
            seqs = [s for s in seqs if not s.finished]
            self.compact()
            if not seqs:
                return
        slot = torch.tensor([self.cursor], device=self.device)
        groups = [seqs] if len({s.long for s in seqs}) == 1 else [[s] for s in seqs]
        for group in groups:
            r0, r1 = min(s.row for s in group), max(s.row for s in group) + 1
            ids = torch.zeros(r1 - r0, dtype=torch.long)
            positions = torch.full((r1 - r0,), -1, dtype=torch.long)
            for s in group:
                ids[s.row - r0] = s.tokens[-1]
                positions[s.row - r0] = len(s.tokens) - 1
            # compiled: one static shape (the whole cache), so the graph is compiled once
            view = self.views(r0, r1, self.max_len if self.compiled else self.cursor + 1)
            ids, positions = ids.to(self.device), positions.to(self.device)
            logits = decode_one_token(self._decode_model, ids, positions, view, slot, long_rope=group[0].long)
            for s in group:
                out[s.row] = logits[s.row - r0]
                s.n_cached = len(s.tokens)
        self.cursor += 1

    def _prefill(self, seqs: list[Sequence], out: dict) -> None:
        seqs = sorted(seqs, key=lambda s: s.row)
        # runs of consecutive rows with the same regime go in one call; other rows are never touched
        groups: list[list[Sequence]] = []
        for s in seqs:
            if groups and groups[-1][-1].row == s.row - 1 and groups[-1][-1].long == s.long:
                groups[-1].append(s)
            else:
                groups.append([s])
        for group in groups:
            for s in group:
                self.cache.pos[s.row].fill_(-1)
                s.n_cached = 0
            T = max(len(s.tokens) for s in group)
            if T > self.max_len:
                for s in group:
                    if self.window is None:
                        self._finish(s, "length")
                    else:
                        self._prefill_ring(s, out)
                continue
            end = max(self.cursor, T)
            if end > self.max_len:
                self.compact()
                end = max(self.cursor, T)
                if end > self.max_len:
                    end = self.max_len  # rows of this group were reset; slots [max_len - T, max_len) are free
            r0, r1 = group[0].row, group[-1].row + 1
            ids = torch.zeros(r1 - r0, T, dtype=torch.long)
            positions = torch.full((r1 - r0, T), -1, dtype=torch.long)
            last = torch.zeros(r1 - r0, dtype=torch.long)
            for i, s in enumerate(group):
                n = len(s.tokens)
                ids[i, :n] = torch.tensor(s.tokens)
                positions[i, :n] = torch.arange(n)
                last[i] = n - 1
            view = self.views(r0, r1, end)  # at most max_len
            logits = prefill(self.model, ids.to(self.device), positions.to(self.device), view, end - T,
                             group[0].config.prefill_chunk, group[0].long, last.to(self.device))
            for i, s in enumerate(group):
                out[s.row] = logits[i]
                s.n_cached = len(s.tokens)
            self.cursor = max(self.cursor, end)

    def _prefill_ring(self, s: Sequence, out: dict) -> None:
        out[s.row] = prefill_ring(self.model, self.views(s.row, s.row + 1, self.max_len), self.cache.pos[s.row],
                                  s.tokens, self.window, s.config.prefill_chunk, s.long)
        s.n_cached = len(s.tokens)
        self.compact()

    def _sample(self, logits: dict[int, torch.Tensor]) -> list[Event]:
        seqs = [self.rows[r] for r in sorted(logits)]
        if len(seqs) > 1 and all(s.plain for s in seqs):  # all greedy: one argmax for the batch
            chosen = torch.stack([logits[s.row] for s in seqs]).argmax(-1).tolist()
        else:
            chosen = [s.choose(logits[s.row]) for s in seqs]
        now = time.perf_counter()
        events = []
        for s, tok in zip(seqs, chosen):
            cache_full = self.window is None and len(s.tokens) >= self.max_len  # no slot left to feed the token
            ev = s.accept(tok, now, cache_full)
            ev.logits = logits[s.row]
            if ev.finish_reason is not None:
                self._free(s)
            events.append(ev)
        return events

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish(reason)
        self._free(s)

    def _free(self, s: Sequence) -> None:
        if self.rows[s.row] is s:
            self.rows[s.row] = None
            self.cache.pos[s.row].fill_(-1)
