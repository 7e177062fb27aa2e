"""Token log-probabilities: the one place a model's outputs become log p(token | the tokens before it).

    s = score_logits(logits (N, V), targets (N,), top=5)       # s.logprob (N,), s.greedy (N,), s.top_ids (N, 5)
    s = score_hidden(model, hidden (N, C), targets (N,))       # model.head only at the N scored positions
    scores = score_positions(model, seqs, wanted)              # batched sequences, right-padded, LongRoPE per sequence
    [(logprob, is_greedy)] = loglikelihood(model, contexts, continuations)
    logps, n = sequence_logps(model, input_ids, mask)          # DPO: summed over a mask, autograd kept

Used by eval (lm-eval's loglikelihood, eval/lm.py), `phiforge perplexity`, the server's echo/logprobs
(serve/scheduler.py) and DPO's sequence log-probs. Everything is computed in fp32 from the head's output, and
autograd is kept whenever it is enabled (wrap a call in torch.no_grad() / inference_mode() to score only).

Batching: sequences of different lengths are right-padded with position -1 (never attended to), so a row's scores
are those of the sequence alone. LongRoPE models follow transformers' rule per sequence: long factors iff the
sequence's length exceeds original_max_position_embeddings; short and long sequences go in separate forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from phiforge.utils import UserError


@dataclass
class TokenScores:
    """Scores of N target tokens, each against its own next-token distribution."""
    logprob: torch.Tensor  # (N,) fp32 log p(target)
    greedy: torch.Tensor  # (N,) bool: the target is the argmax
    top_ids: torch.Tensor | None = None  # (N, k) the k most likely tokens, most likely first (with top=k)
    top_logprobs: torch.Tensor | None = None  # (N, k) their log-probs
    rows: torch.Tensor | None = None  # (N, V) fp32 log-probs of the whole vocabulary (with keep_rows)


def score_logits(logits: torch.Tensor, targets: torch.Tensor, top: int = 0, keep_rows: bool = False) -> TokenScores:
    """logits (N, V) of the distributions the targets (N,) were drawn from -> their log-probs, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    out = TokenScores(logp.gather(-1, targets[:, None])[:, 0], logp.argmax(-1) == targets)
    if top:
        out.top_logprobs, out.top_ids = logp.topk(min(top, logp.shape[-1]))
    if keep_rows:
        out.rows = logp
    return out


def score_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, top: int = 0,
                 chunk: int | None = None) -> TokenScores:
    """Final hidden states (N, C) at the scored positions -> scores of targets (N,). The head runs only on these
    rows, `chunk` at a time when given, so no (N, V) block larger than (chunk, V) is held when scoring."""
    N = hidden.shape[0]
    if chunk is None or N <= chunk:
        return score_logits(model.head(hidden), targets, top)
    parts = [score_logits(model.head(hidden[i:i + chunk]), targets[i:i + chunk], top) for i in range(0, N, chunk)]
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
    return TokenScores(cat("logprob"), cat("greedy"), cat("top_ids"), cat("top_logprobs"))


# ----------------------------------------------------------------------------------------------------------------
# Batches of sequences


def common_prefix_len(seqs: Seq[Seq[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _is_long(model, n: int) -> bool:
    cfg = model.config
    return cfg.rope_scaling is not None and n > cfg.original_max_position_embeddings


def score_positions(model, seqs: list[tuple[int, ...]], wanted: list[list[tuple[int, int]]],
                    min_shared_prefix: int | None = 32) -> list[dict]:
    """For each input sequence (one batch), {(position, token): (log p(token | seq[:position+1]), token is the
    argmax)} for the (position, token) pairs it wants. A prefix common to all sequences of at least
    min_shared_prefix tokens runs once into a KV cache (None: never). Runs under the caller's grad mode."""
    longs = [_is_long(model, len(s)) for s in seqs]
    if any(longs) and not all(longs):  # LongRoPE: short and long sequences go in separate forwards
        out: list = [None] * len(seqs)
        for flag in (False, True):
            idx = [i for i, x in enumerate(longs) if x == flag]
            for i, r in zip(idx, score_positions(model, [seqs[i] for i in idx], [wanted[i] for i in idx],
                                                 min_shared_prefix)):
                out[i] = r
        return out
    # shared prefix, capped so that every scored position stays in the suffix pass
    p = min([common_prefix_len(seqs), *[w[0][0] for w in wanted if w]])
    if min_shared_prefix is None or p < min_shared_prefix or len(seqs) < 2:
        p = 0
    hidden = _hidden(model, seqs, p)  # (B, T - p, C)
    out = []
    for i, w in enumerate(wanted):
        if not w:
            out.append({})
            continue
        idx = torch.tensor([q for q, _ in w], device=model.device) - p
        s = score_hidden(model, hidden[i, idx], torch.tensor([t for _, t in w], device=model.device))
        out.append(dict(zip(w, zip(s.logprob.tolist(), s.greedy.tolist()))))
    return out


def _hidden(model, seqs: list[tuple[int, ...]], p: int) -> torch.Tensor:
    """Final hidden states for positions p.. of every sequence (right-padded). The first p tokens are common to
    all sequences; they run once (batch 1) into a KV cache that is then broadcast to the batch."""
    B, T, dev = len(seqs), max(len(s) for s in seqs), model.device
    ids = torch.zeros(B, T - p, dtype=torch.long)
    pos = torch.full((B, T - p), -1, dtype=torch.long)  # -1 = padding, never attended to
    for i, s in enumerate(seqs):
        ids[i, :len(s) - p] = torch.tensor(s[p:])
        pos[i, :len(s) - p] = torch.arange(p, len(s))
    ids, pos = ids.to(dev), pos.to(dev)
    # the batch is of one LongRoPE regime (score_positions), and the cached prefix must use the same factors
    long_rope = None if model.config.rope_scaling is None else _is_long(model, T)
    if p == 0:
        return model(ids, positions=pos, long_rope=long_rope, return_hidden=True)
    prefix = torch.tensor([seqs[0][:p]], device=dev)
    small = model.make_cache(1, p)
    model(prefix, cache=small, cache_slots=torch.arange(p, device=dev), long_rope=long_rope, return_hidden=True)
    cache = model.make_cache(B, T)
    cache.pos[:, :p] = small.pos
    for big_layer, small_layer in zip(cache.layers, small.layers):
        big_layer.k[:, :, :p] = small_layer.k
        big_layer.v[:, :, :p] = small_layer.v
    return model(ids, positions=pos, cache=cache, cache_slots=torch.arange(p, T, device=dev), long_rope=long_rope,
                 return_hidden=True)


@torch.inference_mode()
def loglikelihood(model, contexts: Seq[Seq[int]], continuations: Seq[Seq[int]], batch_size: int = 8,
                  min_shared_prefix: int | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of token-id lists: (sum of log p(continuation | context), whether greedy
    decoding would produce the continuation), as lm-evaluation-harness scores it. One forward pass per sequence
    (batched, similar lengths together). eval/lm.py adds lm-eval's tokenization and one forward per distinct input."""
    items = []  # (input ids, first scored position, continuation, index)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ids = tuple(int(t) for t in list(ctx) + list(cont))
        if not cont or not ids[:-1]:
            raise UserError(f"pair {i}: need a non-empty continuation and at least one token before it")
        items.append((ids[:-1], len(ids) - 1 - len(cont), ids[len(ids) - len(cont):], i))
    items.sort(key=lambda it: (_is_long(model, len(it[0])), -len(it[0])))  # same regime, similar lengths together
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        wanted = [[(start + j, t) for j, t in enumerate(cont)] for _, start, cont, _ in batch]
        for (_, _, _, i), w, sc in zip(batch, wanted, score_positions(model, [it[0] for it in batch], wanted,
                                                                      min_shared_prefix)):
            hits = [sc[k] for k in w]
            out[i] = (sum(h[0] for h in hits), all(h[1] for h in hits))
    return out


def sequence_logps(model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sequence log-probs: the sum over the masked tokens of log p(token_t | tokens_<t) (B,) and the number of
    masked tokens (B,), from one forward of input_ids (B, T) (positions (B, T): -1 = padding). mask (B, T) marks
    completion tokens aligned with input_ids (token t is scored by the output at t-1). The head runs only on the
    scored positions; autograd is kept when enabled (under autocast the head runs in its dtype, scores in fp32)."""
    hidden = model(input_ids, positions=positions, return_hidden=True)  # (B, T, C)
    m = mask[:, 1:].bool()  # (B, T-1)
    rows, cols = m.nonzero(as_tuple=True)  # the scored (sequence, position) pairs
    s = score_hidden(model, hidden[:, :-1][rows, cols], input_ids[:, 1:][rows, cols], chunk=chunk)
    sums = torch.zeros(input_ids.shape[0], dtype=s.logprob.dtype, device=s.logprob.device).index_add(0, rows,
                                                                                                     s.logprob)
    return sums, m.sum(-1).to(torch.float32)
