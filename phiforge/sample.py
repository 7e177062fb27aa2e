"""Sampling and text: what turns one sequence's next-token logits into tokens, text deltas and a finish reason.

    seq = Sequence.start(prompt_ids, GenerationConfig(temperature=0.7, seed=3), tokenizer, model.config, model.device)
    event = seq.accept(seq.choose(logits))   # logits: fp32 [V] of the next token; event.text is the printable delta

Used by both engines: the single-stream decode path (phiforge.generate) and continuous batching (phiforge.batch).
Neither the model nor the KV cache appears here.

Samplers and logits processors are plain callables: `sampler(logits [B, V] fp32, generator) -> ids [B]` (see
`make_sampler`), `processor(logits [B, V], context_counts [B, V], generated_counts [B, V]) -> logits` (see
`make_penalty_processor`). Order: processors (penalties) -> temperature -> top-k -> top-p -> min-p -> draw.
`IncrementalDetokenizer` emits only complete text; `StopStringFilter` holds back what may start a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence as Seq

import torch

from phiforge.utils import UserError

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
# One sequence: its sampling, stopping and text state


@dataclass(eq=False)
class Sequence:
    """One sequence (request) being generated. Engines own where its tokens live in a cache (`row`, `n_cached`,
    `long`); `choose` and `accept` are the same for every engine."""
    prompt_ids: list[int]
    config: GenerationConfig
    row: int = 0
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
    # private helpers, set by Sequence.start
    sampler: Sampler = greedy
    processors: list = field(default_factory=list)
    generator: torch.Generator | None = None
    stop_ids: frozenset = frozenset()
    detok: IncrementalDetokenizer | None = None
    stopper: StopStringFilter | None = None
    context_counts: torch.Tensor | None = None
    generated_counts: torch.Tensor | None = None

    @classmethod
    def start(cls, prompt_ids: Seq[int], config: GenerationConfig | None, tokenizer, model_config, device,
              **fields) -> "Sequence":
        """A new sequence for `prompt_ids` (checked against the vocabulary), with its sampler, processors, stop set,
        detokenizer and counts built from `config`. fields: row, index, tag, n_decode_skip."""
        config = config or GenerationConfig()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        V = model_config.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < V]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {V})")
        seq = cls(prompt_ids, config, tokens=list(prompt_ids), t_start=time.perf_counter(), **fields)
        seq.sampler = make_sampler(config.temperature, config.top_k, config.top_p, config.min_p)
        seq.processors = [p for p in [make_penalty_processor(config.repetition_penalty, config.presence_penalty,
                                                             config.frequency_penalty)] if p is not None]
        seq.processors += list(config.extra_processors)
        if config.seed is not None:
            seq.generator = torch.Generator(device).manual_seed(int(config.seed))
        if config.stop_ids is not None:
            seq.stop_ids = frozenset(int(i) for i in config.stop_ids)
        elif tokenizer is not None:
            seq.stop_ids = frozenset(tokenizer.stop_ids)
        else:
            seq.stop_ids = frozenset([model_config.eos_token_id])
        if tokenizer is not None:
            seq.detok = IncrementalDetokenizer(tokenizer, prompt_ids, config.skip_special_tokens)
        elif config.stop_strings:
            raise UserError("stop strings need a tokenizer")
        seq.stopper = StopStringFilter(config.stop_strings)
        if seq.processors:
            seq.context_counts = torch.bincount(torch.tensor(prompt_ids), minlength=V)[None].float().to(device)
            seq.generated_counts = torch.zeros(1, V, device=device)
        if config.rope_policy == "fixed":  # the factors for the longest the sequence may get, chosen once
            seq.long = (model_config.rope_scaling is not None and
                        len(prompt_ids) + config.max_new_tokens > model_config.original_max_position_embeddings)
        return seq

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain(self) -> bool:
        """Greedy with no processors: a batch of such sequences may take one argmax."""
        return self.sampler is greedy and not self.processors

    def needs_long(self, model_config) -> bool:
        """The LongRoPE regime of the next model call: transformers' rule ("dynamic") or the one chosen at start."""
        if self.config.rope_policy == "fixed" or model_config.rope_scaling is None:
            return self.long
        return len(self.tokens) > model_config.original_max_position_embeddings

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from fp32 logits [V]: processors, then the sampler (with this sequence's generator)."""
        x = logits[None]
        for p in self.processors:
            x = p(x, self.context_counts, self.generated_counts)
        return int(self.sampler(x, self.generator)[0])

    def accept(self, tok: int, now: float | None = None, cache_full: bool = False) -> Event:
        """Append a chosen token; returns its Event (text delta, finish reason). now: when it was chosen (one clock
        reading for a whole batch step); cache_full: no slot is left to feed the token to the model, so the sequence
        ends with "length"."""
        now = time.perf_counter() if now is None else now
        if self.t_first is None:
            self.t_first = now
        if len(self.generated) == self.n_decode_skip:  # decode speed is timed from here (after any warm-up step)
            self.t_decode = now
        self.tokens.append(tok)
        self.generated.append(tok)
        if self.context_counts is not None:
            self.context_counts[0, tok] += 1
            self.generated_counts[0, tok] += 1
        text, reason = "", None
        if tok in self.stop_ids:
            reason = "stop"
            text = self.stopper.flush() if self.detok is not None else ""
        else:
            if self.detok is not None:
                text, hit = self.stopper.feed(self.detok.add(tok))
                if hit:
                    reason = "stop"
            if reason is None and (len(self.generated) >= self.config.max_new_tokens or cache_full):
                reason = "length"
                if self.detok is not None:
                    more, hit = self.stopper.feed(self.detok.flush())
                    text += more if hit else more + self.stopper.flush()
                    reason = "stop" if hit else reason
        self.text += text
        ev = Event(self, tok, text)
        if reason is not None:
            self.finish(reason)
            ev.finish_reason = reason
        return ev

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.t_end = time.perf_counter()

    def result(self) -> GenerationResult:
        end = self.t_end or time.perf_counter()
        first = self.t_first or end
        # a compiled decode step compiles on its first call: that step is warm-up, not decode speed
        n_dec = max(len(self.generated) - 1 - self.n_decode_skip, 0) if self.t_decode else 0
        dec_start = self.t_decode or end
        return GenerationResult(list(self.prompt_ids), list(self.generated), self.text, self.finish_reason or "",
                                ttft_s=first - self.t_start,
                                decode_tokens_per_s=n_dec / (end - dec_start) if n_dec and end > dec_start else 0.0)
