"""Inference engine: static KV cache, exact LongRoPE, sampling, streaming, batching; `phiforge generate`.

    phiforge generate runs/demo/final --prompt "Once upon a time" --max-new-tokens 64
    phiforge generate microsoft/Phi-3-mini-4k-instruct --chat --prompt "Hi!" --temperature 0.7 --seed 1 --dtype bfloat16
    python -m phiforge.generate tiny-folder --prompt "Hello" --stop "." --threads 2

Layers, small to large (each one calls only the one below it):

1. `prefill(model, ...)` / `decode_one_token(model, ...)`: one model call over a static `KVCache` (or a row/slot view
   of it), returning fp32 next-token logits.
2. `BatchState`: the mutable state of a batch of sequences sharing one preallocated cache. Each sequence owns a cache
   *row*; all rows share a slot *cursor* (the slot the next decode step writes). The attention mask comes from the
   positions stored per slot (model.KVCache), so rows of different lengths, gaps left by padding, compaction and
   re-prefills are all exact. `step()` runs one engine step and returns `Event`s.
3. `stream_generate(model, tokenizer, prompts, config)`: a generator of `Event`s (token id, text delta, finish reason).
4. `generate(...)`: the final `GenerationResult`s.  5. `main(argv)`: the CLI.  `phiforge chat` and the server call 3/2.

Batch/slot API for a server (continuous batching). Sequences can be added and removed between decode steps:

    state = BatchState(model, tokenizer, max_batch=8, max_len=4096)
    seq = state.add(prompt_ids, GenerationConfig(max_new_tokens=128, temperature=0.7, seed=3), tag=request_id)
    while state.active():                     # add()/remove() may be called between any two steps
        for ev in state.step():               # ev.seq.tag tells which request; ev.text is the delta
            send(ev.seq.tag, ev.token_id, ev.text, ev.finish_reason)
    state.remove(seq)                         # cancel: frees its row now (finished rows are freed automatically)

`add` raises `BatchFull` when all rows are busy; `state.free_rows()` says how many are left. A sequence added
between steps is prefilled at the next `step()` (pending rows are prefilled together, chunked by
`GenerationConfig.prefill_chunk`) while the other rows decode. When the shared cursor reaches the end of the cache,
the cache is compacted (each row's live slots move to the front, in position order); for sliding-window models the
keys that no future query can see (position < next - window) are evicted at the same time, so a windowed model runs
exactly with a cache of window + prefill-chunk slots. A sequence whose own length exceeds the cache ends with
finish_reason "length".

LongRoPE policies (`GenerationConfig.rope_policy`), for models with rope_scaling (short/long factor sets):

* "dynamic" (default, = transformers): a model call uses the long factors iff the sequence's total length (the
  tokens seen so far, including the one being fed) exceeds original_max_position_embeddings. A prompt longer than
  that is prefilled (every chunk) with long factors. When generation first crosses the boundary, the sequence's
  whole cache is recomputed with long factors (one re-prefill, like Phi3ForCausalLM.prepare_inputs_for_generation),
  so every step equals a full forward pass over the sequence so far.
* "fixed": the factors are chosen once from the maximum length (prompt + max_new_tokens) and never change: no
  re-prefill, but a sequence that ends up short was run with long factors, which differs from transformers and from a
  full forward pass of the shorter sequence.

Rows whose regimes differ in one step are run in separate model calls, so a batch gives exactly the tokens of the
sequences run one at a time.

Samplers and logits processors are plain callables: `sampler(logits [B, V] fp32, generator) -> ids [B]` (see
`make_sampler`), `processor(logits [B, V], context_counts [B, V], generated_counts [B, V]) -> logits` (see
`make_penalty_processor`). Order: processors (penalties) -> temperature -> top-k -> top-p -> min-p -> draw.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence as Seq

import torch

from phiforge.fast import use_bf16_kernel
from phiforge.utils import ArgumentParser, UserError

Sampler = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
Processor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Configuration, events, results


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL/transformers: divides positive logits of tokens in prompt + output
    presence_penalty: float = 0.0  # OpenAI: minus this for tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the count of each generated token
    seed: int | None = None  # per-sequence generator: same seed -> same tokens (alone or batched)
    stop_ids: Iterable[int] | None = None  # None -> tokenizer.stop_ids (or the config's eos without a tokenizer)
    stop_strings: Seq[str] = ()  # never printed; caught across token boundaries
    rope_policy: str = "dynamic"  # "dynamic" (= transformers) or "fixed" (see module docstring)
    prefill_chunk: int = 512
    skip_special_tokens: bool = True  # in the text deltas
    extra_processors: Seq[Processor] = ()

    def __post_init__(self):
        if self.rope_policy not in ("dynamic", "fixed"):
            raise UserError(f"rope_policy must be 'dynamic' or 'fixed', not {self.rope_policy!r}")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 or self.top_k < 0:
            raise UserError("need temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, top_k >= 0")
        if self.repetition_penalty <= 0:
            raise UserError("repetition_penalty must be > 0 (1.0 = off)")
        if self.prefill_chunk < 1:
            raise UserError("prefill_chunk must be >= 1")


@dataclass
class Event:
    """One generated token of one sequence. `text` is the printable delta (may be "" while a multi-byte character or
    a possible stop string is held back). `finish_reason` is None, "stop" (stop id or stop string) or "length"."""
    seq: "Sequence"
    token_id: int
    text: str
    finish_reason: str | None = None
    logits: torch.Tensor | None = None  # fp32 [V] next-token logits this token was drawn from (before processors)

    @property
    def index(self) -> int:
        return self.seq.index


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including a final stop id if one ended the sequence
    text: str
    finish_reason: str
    ttft_s: float = 0.0  # time to first token
    decode_tokens_per_s: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Samplers and processors (plain callables)


def greedy(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return logits.argmax(dim=-1)


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """`sampler(logits [B, V], generator=None) -> ids [B]`. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return greedy

    def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        if min_p > 0.0:
            probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


def make_penalty_processor(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0) -> Processor | None:
    """`processor(logits, context_counts, generated_counts) -> logits`; None when all penalties are off.
    context_counts count prompt + generated tokens, generated_counts only the generated ones."""
    if repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0:
        return None

    def penalize(logits: torch.Tensor, context_counts: torch.Tensor, generated_counts: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if repetition_penalty != 1.0:
            seen = context_counts > 0
            scaled = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, scaled, logits)
        if presence_penalty:
            logits = logits - presence_penalty * (generated_counts > 0).float()
        if frequency_penalty:
            logits = logits - frequency_penalty * generated_counts.float()
        return logits

    return penalize


# ----------------------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas. Decodes a short window of ids and emits only text that is
    complete: a delta never ends in half a UTF-8 character (the U+FFFD the decoder makes for a partial one), and
    context-dependent spacing (SentencePiece) is right because the window starts a few tokens back."""

    def __init__(self, tokenizer, prompt_ids: Seq[int] = (), skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids = [int(i) for i in list(prompt_ids)[-4:]]
        self.prefix, self.read = 0, len(self.ids)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self.ids = self.ids[self.read:]  # keep only the new window
            self.prefix, self.read = 0, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), even an incomplete character."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


class StopStringFilter:
    """Holds back text that may be the start of a stop string; reports when one appears (it is never emitted)."""

    def __init__(self, stop_strings: Seq[str]):
        self.stops = [s for s in stop_strings if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# ----------------------------------------------------------------------------------------------------------------
# Layer 1: model calls on the static cache


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
    return model.lm_head(last).float()


def decode_one_token(model, token_ids: torch.Tensor, positions: torch.Tensor, cache, slot: torch.Tensor,
                     long_rope: bool | None = None) -> torch.Tensor:
    """One token per row: token_ids [B] at positions [B] (-1 = idle row) into slot [1]. Returns fp32 logits [B, V]."""
    logits = model(token_ids[:, None], positions[:, None], cache=cache, cache_slots=slot, long_rope=long_rope)
    return logits[:, -1].float()


# ----------------------------------------------------------------------------------------------------------------
# Layer 2: batch state


_COMPILED: dict = {}


def compiled_cache_len(n: int) -> int:
    """Cache slots for a compiled decode step that must hold n tokens. The step has one static shape per cache size,
    so sizes are rounded up to a multiple of 256: requests of nearby lengths reuse one graph."""
    return -(-n // 256) * 256


def _compiled(model):
    """torch.compile'd model for decode calls, built once per model (compiling takes a while)."""
    key = id(model)
    if key not in _COMPILED or _COMPILED[key][0] is not model:
        _COMPILED[key] = (model, torch.compile(model, dynamic=False))
    return _COMPILED[key][1]


class BatchFull(Exception):
    """All rows of the BatchState are in use."""


@dataclass(eq=False)
class Sequence:
    """One sequence (request) in a BatchState."""
    prompt_ids: list[int]
    config: GenerationConfig
    row: int
    index: int = 0  # caller's index (generate: position in the prompt list)
    tag: object = None  # caller's handle (the server's request id)
    tokens: list[int] = field(default_factory=list)  # prompt + generated; tokens[n_cached:] are not in the cache
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    n_cached: int = 0
    long: bool = False  # LongRoPE regime of what is in the cache / of the next call
    t_start: float = 0.0
    t_first: float | None = None
    t_decode: float | None = None  # decode tokens/s is timed from this token: the first, or (compiled) the second
    n_decode_skip: int = 0  # decode steps left out of tokens/s as warm-up (1 when compiled: it compiles)
    t_end: float | None = None
    # private helpers, set by BatchState.add
    sampler: Sampler = greedy
    processors: list = field(default_factory=list)
    generator: torch.Generator | None = None
    stop_ids: frozenset = frozenset()
    detok: IncrementalDetokenizer | None = None
    stopper: StopStringFilter | None = None
    context_counts: torch.Tensor | None = None
    generated_counts: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        end = self.t_end or time.perf_counter()
        first = self.t_first or end
        # a compiled decode step compiles on its first call: that step is warm-up, not decode speed
        n_dec = max(len(self.generated) - 1 - self.n_decode_skip, 0) if self.t_decode else 0
        dec_start = self.t_decode or end
        return GenerationResult(list(self.prompt_ids), list(self.generated), self.text, self.finish_reason or "",
                                ttft_s=first - self.t_start,
                                decode_tokens_per_s=n_dec / (end - dec_start) if n_dec and end > dec_start else 0.0)


class BatchState:
    """Sequences sharing one static KVCache of `max_batch` rows x `max_len` slots. See the module docstring."""

    def __init__(self, model, tokenizer=None, max_batch: int = 1, max_len: int | None = None,
                 compile: bool = False, bucket: int = 64):
        cfg = model.config
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.device = model.model.norm.weight.device
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.cache = model.make_cache(max_batch, self.max_len)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.cursor = 0  # next slot a decode step writes (shared by all rows)
        self.bucket = bucket  # decode attends to slots [0, cursor+1) rounded up to a multiple of this
        self._views: dict = {}
        self.compiled = compile
        use_bf16_kernel(model)  # bf16 on CPU: decode rows through our GEMV kernel (phiforge/fast.py); else no-op
        self._decode_model = _compiled(model) if compile else model
        self.window = cfg.sliding_window
        self.long_capable = cfg.rope_scaling is not None
        self.original_max = cfg.original_max_position_embeddings

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
        config = config or GenerationConfig()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        bad = [i for i in prompt_ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {self.cfg.vocab_size})")
        if len(prompt_ids) > self.max_len and self.window is None:
            raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the cache of {self.max_len} slots")
        try:
            row = self.rows.index(None)
        except ValueError:
            raise BatchFull(f"all {len(self.rows)} rows are busy") from None
        seq = Sequence(prompt_ids, config, row, index=index, tag=tag, tokens=list(prompt_ids),
                       t_start=time.perf_counter(), n_decode_skip=1 if self.compiled else 0)
        seq.sampler = make_sampler(config.temperature, config.top_k, config.top_p, config.min_p)
        seq.processors = [p for p in [make_penalty_processor(config.repetition_penalty, config.presence_penalty,
                                                             config.frequency_penalty)] if p is not None]
        seq.processors += list(config.extra_processors)
        if config.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(int(config.seed))
        if config.stop_ids is not None:
            seq.stop_ids = frozenset(int(i) for i in config.stop_ids)
        elif self.tok is not None:
            seq.stop_ids = frozenset(self.tok.stop_ids)
        else:
            seq.stop_ids = frozenset([self.cfg.eos_token_id])
        if self.tok is not None:
            seq.detok = IncrementalDetokenizer(self.tok, prompt_ids, config.skip_special_tokens)
        elif config.stop_strings:
            raise UserError("stop strings need a tokenizer")
        seq.stopper = StopStringFilter(config.stop_strings)
        if seq.processors:
            V = self.cfg.vocab_size
            seq.context_counts = torch.bincount(torch.tensor(prompt_ids), minlength=V)[None].float().to(self.device)
            seq.generated_counts = torch.zeros(1, V, device=self.device)
        if config.rope_policy == "fixed":
            seq.long = self.long_capable and len(prompt_ids) + config.max_new_tokens > self.original_max
        self.rows[row] = seq
        return seq

    def remove(self, seq: Sequence) -> None:
        """Free the row of `seq` (cancel it, or forget a finished one). Its cache row is reset."""
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
            self.cache.pos[seq.row].fill_(-1)
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"

    # -- cache management ------------------------------------------------------------------------------------------
    def _view(self, r0: int, r1: int, n: int):
        n = min(self.max_len, -(-n // self.bucket) * self.bucket)
        key = (r0, r1, n)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:
                self._views.clear()
            view = self._views[key] = CacheView(self.cache, r0, r1, n)
        return view

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
            idx = torch.nonzero(keep).squeeze(-1)
            idx = idx[torch.argsort(pos[r, idx])]
            n = idx.numel()
            for layer in self.cache.layers:
                layer.k[r, :, :n] = layer.k[r, :, idx]
                layer.v[r, :, :n] = layer.v[r, :, idx]
            pos[r, :n] = pos[r, idx].clone()
            pos[r, n:] = -1
            top = max(top, n)
        self.cursor = top
        self._views.clear()

    def _needs_long(self, seq: Sequence) -> bool:
        if seq.config.rope_policy == "fixed" or not self.long_capable:
            return seq.long
        return len(seq.tokens) > self.original_max

    # -- one engine step -------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Prefill the sequences that need it, decode one token for every other live sequence, sample, and return one
        Event per sequence that produced a token. Finished sequences leave their rows."""
        with torch.inference_mode():
            pending, decoding = [], []
            for seq in self.active():
                need_long = self._needs_long(seq)
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
            view = self._view(r0, r1, self.max_len if self.compiled else self.cursor + 1)
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
            view = self._view(r0, r1, self.max_len) if end == self.max_len else self._view(r0, r1, end)
            logits = prefill(self.model, ids.to(self.device), positions.to(self.device), view, end - T,
                             group[0].config.prefill_chunk, group[0].long, last.to(self.device))
            for i, s in enumerate(group):
                out[s.row] = logits[i]
                s.n_cached = len(s.tokens)
            self.cursor = max(self.cursor, end)

    def _prefill_ring(self, s: Sequence, out: dict) -> None:
        """Sliding-window model, sequence longer than the cache: prefill chunk by chunk into the row's free slots,
        evicting keys no later query can see (position < chunk start - window). Exact; then compact()."""
        r, pos, n = s.row, self.cache.pos[s.row], len(s.tokens)
        view = self._view(r, r + 1, self.max_len)
        chunk, h = s.config.prefill_chunk, None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            pos.masked_fill_(pos < c0 - self.window, -1)
            free = torch.nonzero(pos < 0).squeeze(-1)[: c1 - c0]
            if free.numel() < c1 - c0:
                raise UserError(f"a cache of {self.max_len} slots is too small for sliding window {self.window} "
                                f"plus prefill chunks of {chunk}; use max_len >= window + 1 + prefill_chunk")
            h = self.model(torch.tensor([s.tokens[c0:c1]], device=self.device),
                           torch.arange(c0, c1, device=self.device)[None], cache=view, cache_slots=free,
                           long_rope=s.long, return_hidden=True)
        out[r] = self.model.lm_head(h[0, -1]).float()
        s.n_cached = n
        self.compact()

    def _sample(self, logits: dict[int, torch.Tensor]) -> list[Event]:
        events = []
        seqs = [self.rows[r] for r in sorted(logits)]
        plain = all(s.sampler is greedy and not s.processors for s in seqs)
        if plain and len(seqs) > 1:
            chosen = torch.stack([logits[s.row] for s in seqs]).argmax(-1).tolist()
        else:
            chosen = []
            for s in seqs:
                x = logits[s.row][None]
                for p in s.processors:
                    x = p(x, s.context_counts, s.generated_counts)
                chosen.append(int(s.sampler(x, s.generator)[0]))
        now = time.perf_counter()
        for s, tok in zip(seqs, chosen):
            if s.t_first is None:
                s.t_first = now
            if len(s.generated) == s.n_decode_skip:  # decode speed is timed from here (after any warm-up step)
                s.t_decode = now
            ev = self._accept(s, tok)
            ev.logits = logits[s.row]
            events.append(ev)
        return events

    def _accept(self, s: Sequence, tok: int) -> Event:
        s.tokens.append(tok)
        s.generated.append(tok)
        if s.context_counts is not None:
            s.context_counts[0, tok] += 1
            s.generated_counts[0, tok] += 1
        text, reason = "", None
        if tok in s.stop_ids:
            reason = "stop"
            text = s.stopper.flush() if s.detok is not None else ""
        else:
            if s.detok is not None:
                text, hit = s.stopper.feed(s.detok.add(tok))
                if hit:
                    reason = "stop"
            cache_full = self.window is None and len(s.tokens) > self.max_len  # no slot left to feed it
            if reason is None and (len(s.generated) >= s.config.max_new_tokens or cache_full):
                reason = "length"
                if s.detok is not None:
                    more, hit = s.stopper.feed(s.detok.flush())
                    text += more if hit else more + s.stopper.flush()
                    reason = "stop" if hit else reason
        s.text += text
        ev = Event(s, tok, text)
        if reason is not None:
            self._finish(s, reason)
            ev.finish_reason = reason
        return ev

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        s.t_end = time.perf_counter()
        if self.rows[s.row] is s:
            self.rows[s.row] = None
            self.cache.pos[s.row].fill_(-1)


# ----------------------------------------------------------------------------------------------------------------
# Layers 3 and 4: stream_generate and generate


def _as_config(config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    if config is None:
        return GenerationConfig(**kwargs)
    return replace(config, **kwargs) if kwargs else config


def _prompt_batch(tokenizer, prompts) -> tuple[list[list[int]], bool]:
    """str | list[int] | list[str] | list[list[int]] -> (list of id lists, was a single prompt)."""
    def ids(p):
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("a text prompt needs a tokenizer; pass token ids instead")
            return tokenizer.encode(p, add_special_tokens=True)
        return [int(i) for i in (p.tolist() if isinstance(p, torch.Tensor) else p)]

    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                    isinstance(prompts[0], int)):
        return [ids(prompts)], True
    if isinstance(prompts, torch.Tensor):
        return ([ids(prompts)], True) if prompts.dim() == 1 else ([ids(p) for p in prompts], False)
    return [ids(p) for p in prompts], False


def stream_generate(model, tokenizer, prompts, config: GenerationConfig | None = None, *, max_len: int | None = None,
                    compile: bool = False, **kwargs) -> Iterator[Event]:
    """Yield one Event per generated token of each prompt (`event.index` = the prompt's index), as it is made.
    prompts: a string or token ids, or a list of either (batched, per-sequence stopping). kwargs override
    GenerationConfig fields. The cache holds max(prompt) + max_new_tokens slots unless max_len is given."""
    config = _as_config(config, kwargs)
    batch, _ = _prompt_batch(tokenizer, prompts)
    if not batch:
        return
    if max_len is None:
        max_len = max(len(p) for p in batch) + config.max_new_tokens
        if compile:
            max_len = compiled_cache_len(max_len)
    state = BatchState(model, tokenizer, max_batch=len(batch), max_len=max_len, compile=compile)
    for i, ids in enumerate(batch):
        state.add(ids, config, index=i)
    while state.active():
        yield from state.step()


def generate(model, tokenizer, prompts, config: GenerationConfig | None = None, **kwargs):
    """Run stream_generate to the end. Returns a GenerationResult for a single prompt, a list for a list."""
    _, single = _prompt_batch(tokenizer, prompts)
    seqs: dict[int, Sequence] = {}
    for ev in stream_generate(model, tokenizer, prompts, config, **kwargs):
        seqs[ev.index] = ev.seq
    results = [seqs[i].result() for i in sorted(seqs)]
    return results[0] if single else results


def loglikelihood(model, contexts: Seq[Seq[int]], continuations: Seq[Seq[int]], batch_size: int = 8
                  ) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of token-id lists: (sum of log p(continuation | context), whether greedy
    decoding would produce the continuation), as lm-evaluation-harness scores it. One full forward pass per
    sequence (batched, right-padded with position -1; LongRoPE chosen per sequence by transformers' rule)."""
    cfg = model.config
    items = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ids = [int(t) for t in list(ctx) + list(cont)]
        if not cont or not ids[:-1]:
            raise UserError(f"pair {i}: need a non-empty continuation and at least one token before it")
        long_ = cfg.rope_scaling is not None and len(ids) - 1 > cfg.original_max_position_embeddings
        items.append((long_, len(ids), i, ids[:-1], ids[len(ids) - len(cont):]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    items.sort(key=lambda it: (it[0], -it[1]))  # same regime together, similar lengths together
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            chunk = [it for it in items[b:b + batch_size] if it[0] == items[b][0]]
            rest = [it for it in items[b:b + batch_size] if it[0] != items[b][0]]
            for group in (chunk, rest):
                if not group:
                    continue
                T = max(len(it[3]) for it in group)
                ids = torch.zeros(len(group), T, dtype=torch.long)
                positions = torch.full((len(group), T), -1, dtype=torch.long)
                for r, it in enumerate(group):
                    ids[r, :len(it[3])] = torch.tensor(it[3])
                    positions[r, :len(it[3])] = torch.arange(len(it[3]))
                dev = model.model.norm.weight.device
                logp = torch.log_softmax(model(ids.to(dev), positions.to(dev), long_rope=group[0][0]).float(), dim=-1)
                logp = logp.cpu()
                for r, (_, _, i, inp, target) in enumerate(group):
                    n = len(target)
                    lp = logp[r, len(inp) - n:len(inp)]
                    tgt = torch.tensor(target)
                    out[i] = (float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="HF model folder (with tokenizer) or Hub repo id")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int | None = 256) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                    help="capped at what the context leaves after the prompt" if max_new_tokens else
                    "default: what the context leaves after the prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--presence-penalty", type=float, default=0.0)
    ap.add_argument("--frequency-penalty", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--rope-policy", choices=["dynamic", "fixed"], default="dynamic")


def config_from_args(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens or GenerationConfig.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            seed=args.seed, stop_strings=tuple(args.stop), rope_policy=args.rope_policy)


def load_for_cli(args):
    """Load (model, tokenizer) for a CLI; a folder without a tokenizer is a UserError."""
    from phiforge import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model); save the model with "
                        "its tokenizer, e.g. phiforge.checkpoint.save_hf_folder(model, folder, tokenizer)")
    return model.eval(), tokenizer


def fit_to_context(prompt_len: int, max_new_tokens: int, context: int) -> tuple[int, str | None]:
    """(tokens to generate, notice or None): generation stops at the end of the context, as llama.cpp's -c does,
    rather than failing or running past the positions the model knows. A prompt that leaves no room is a UserError."""
    room = context - prompt_len
    if room < 1:
        raise UserError(f"the prompt is {prompt_len} tokens; the model's context is {context} tokens: shorten it")
    if max_new_tokens <= room:
        return max_new_tokens, None
    return room, (f"--max-new-tokens {max_new_tokens} capped at {room}: the prompt uses {prompt_len} of the "
                  f"context of {context} tokens")


def read_prompt(args) -> str:
    """--prompt TEXT, --prompt - (stdin) or --prompt-file FILE, as llama.cpp's -p / -f."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge generate", description="Generate text; streams it to stdout, "
                                 "prints time-to-first-token and tokens/s to stderr.")
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt; - reads it from stdin")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--system", default=None, help="system message; implies --chat")
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    config = config_from_args(args)
    text = read_prompt(args)
    model, tokenizer = load_for_cli(args)
    if args.chat or args.system is not None:  # a system message only exists in a chat template
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        prompt = tokenizer.encode(text, add_special_tokens=True)
    n, notice = fit_to_context(len(prompt), config.max_new_tokens, model.config.max_position_embeddings)
    if notice:
        print(f"phiforge generate: notice: {notice}", file=sys.stderr, flush=True)
        config = replace(config, max_new_tokens=n)
    seq = None
    for ev in stream_generate(model, tokenizer, prompt, config, compile=args.compile):
        seq = ev.seq
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    r = seq.result()
    print(f"[{len(r.token_ids)} tokens, finish={r.finish_reason}, time-to-first-token {r.ttft_s * 1000:.1f} ms, "
          f"decode {r.decode_tokens_per_s:.1f} tokens/s, prompt {len(prompt)} tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
