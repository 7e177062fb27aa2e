"""The local model backend: log-likelihoods of (context, continuation) pairs and greedy generation.

Log-likelihoods follow lm-eval's HFLM (lm_eval/api/model.py `_encode_pair`, `loglikelihood`,
lm_eval/models/huggingface.py `tok_encode`, `_loglikelihood_tokens`): trailing spaces of the context move to the
continuation; context and context+continuation are encoded with the special tokens the tokenizer adds (Tokenizer.encode,
e.g. the <s> that Phi-3's tokenizer.json prepends; none for a text that already starts with the prefix token) and
the continuation tokens are the tail of the whole; the model sees (context + continuation)[:-1], left-truncated to
max_length; the score is the summed log-softmax of the continuation tokens, plus whether each was the argmax
(is_greedy). `add_bos_token` overrides the tokenizer as lm-eval's model argument of that name does.

What makes it faster than lm-eval on the same model (same numbers up to float rounding):
1. one forward per distinct token sequence: a request whose input is a prefix of another's (MMLU's four one-token
   answers, or any shorter sequence) is read off the longer one's logits;
2. sequences are sorted by tokens, so each batch shares a long prefix (MMLU's description + 5 shots): that prefix
   runs once through the model into a KV cache, then only the suffixes run, as one batch;
3. the vocabulary projection and log-softmax run only at the positions that are scored.
The scoring itself (padding, LongRoPE regimes, the shared-prefix cache, log-softmax) is phiforge.scoring's.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from tqdm import tqdm

from phiforge.scoring import common_prefix_len, score_positions


class LocalLM:
    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int | None = None,
                 min_shared_prefix: int = 32, add_bos_token: bool | None = None):
        # add_bos_token as lm-eval's: None follows the tokenizer; set, it reloads the tokenizer with that
        # add_bos_token and encodes with add_special_tokens=add_bos_token
        if add_bos_token is not None:
            tokenizer = tokenizer.with_add_bos_token(add_bos_token)
        self.model, self.tok, self.add_bos_token = model.eval(), tokenizer, add_bos_token
        self.batch_size, self.min_shared_prefix = batch_size, min_shared_prefix
        self.max_length = max_length or model.config.max_position_embeddings
        self.encode = lru_cache(maxsize=65536)(self.tok_encode)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> tuple[int, ...]:
        """lm-eval HFLM.tok_encode: the tokenizer's special tokens unless add_bos_token or the caller says otherwise,
        and none for a text that already starts with the prefix token's string."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token is not False
            if text.startswith(self.tok.decode([self.prefix_token_id])):
                add_special_tokens = False
        return tuple(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def prompt_ids(self, text: str) -> list[int]:
        """lm-eval HFLM.tok_batch_encode (generation prompts): no special tokens for a text that starts with the BOS
        string, else add_bos_token's choice, else the tokenizer's."""
        bos = self.tok.bos_token
        special = not (bos and text.startswith(bos)) and self.add_bos_token is not False
        return self.tok.encode(text, add_special_tokens=special)

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    @property
    def prefix_token_id(self) -> int:
        """lm-eval HFLM.prefix_token_id: BOS if the tokenizer has one, else EOS (conditions empty contexts)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if context == "":  # conditioned on the prefix token, unless the continuation starts with it
            cont = self.tok_encode(continuation, add_special_tokens=False)
            return ((self.prefix_token_id,), cont) if cont[:1] != (self.prefix_token_id,) else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # -- log-likelihoods --------------------------------------------------------------------------------------
    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = True) -> list[tuple[float, bool]]:
        """[(sum log p(continuation | context), is_greedy)] for each (context, continuation) pair."""
        reqs = []  # (input tokens, first scored position, continuation tokens)
        for context, continuation in pairs:
            ctx, cont = self.encode_pair(context, continuation)
            whole = (ctx + cont)[-(self.max_length + 1):]
            inp = whole[:-1]
            reqs.append((inp, len(inp) - len(cont), cont))
        # 1. one forward per distinct sequence: sorted, a sequence that is a prefix of the next one is served by it
        uniq = sorted({r[0] for r in reqs})
        serve = {}
        rep = None
        for seq in reversed(uniq):
            if rep is None or rep[:len(seq)] != seq:
                rep = seq
            serve[seq] = rep
        reps = sorted(set(serve.values()))
        needed: dict[tuple, set[tuple[int, int]]] = {s: set() for s in reps}  # (position, token) to score
        for inp, start, cont in reqs:
            needed[serve[inp]].update((start + j, t) for j, t in enumerate(cont))
        # 2./3. batched forwards over representatives, scoring only needed positions
        scored: dict[tuple, dict[tuple[int, int], tuple[float, bool]]] = {}
        bar = tqdm(total=len(reps), desc="loglikelihood", disable=not progress, leave=False)
        for batch in self._batches(reps):
            for seq, sc in zip(batch, self._score(batch, [sorted(needed[s]) for s in batch])):
                scored[seq] = sc
            bar.update(len(batch))
        bar.close()
        out = []
        for inp, start, cont in reqs:
            sc = scored[serve[inp]]
            hits = [sc[(start + j, t)] for j, t in enumerate(cont)]
            out.append((sum(h[0] for h in hits), all(h[1] for h in hits)))
        return out

    def _batches(self, reps: list[tuple]) -> list[list[tuple]]:
        """Consecutive sorted sequences, at most batch_size each; a batch that shares a prefix worth caching is
        closed rather than extended by a sequence that would break the sharing."""
        batches, cur, shared = [], [], 0
        for seq in reps:
            if cur:
                k = min(shared, common_prefix_len([cur[0], seq]))
                if len(cur) == self.batch_size or (len(cur) > 1 and k < self.min_shared_prefix <= shared):
                    batches.append(cur)
                    cur = []
                else:
                    shared = k
            if not cur:
                shared = len(seq)
            cur.append(seq)
        return batches + ([cur] if cur else [])

    @torch.no_grad()
    def _score(self, seqs: list[tuple], wanted: list[list[tuple[int, int]]]) -> list[dict]:
        """For each sequence, {(position, token): (log p(token | tokens before position+1), token is the argmax)}."""
        return score_positions(self.model, seqs, wanted, self.min_shared_prefix)

    def loglikelihood_rolling(self, text: str) -> tuple[float, int]:
        """(sum log p(text), n tokens) over lm-eval's rolling windows (lm_eval/utils.py `get_rolling_token_windows`
        with context_len=1 + `make_disjoint_window`) of tok_encode(text), special tokens included as lm-eval's
        loglikelihood_rolling has them (a BOS the tokenizer adds is itself predicted from the prefix token): the
        first window is conditioned on the prefix token (BOS, else EOS), each later one predicts the next
        <= max_length tokens from the max_length tokens before them."""
        toks, L = list(self.tok_encode(text)), self.max_length
        if not toks:
            return 0.0, 0
        n1 = min(L, len(toks))
        windows = [(tuple([self.prefix_token_id] + toks[:n1 - 1]), 0, toks[:n1])]  # (input, first scored, targets)
        done = n1
        while done < len(toks):
            k = min(len(toks) - done, L)
            end = done + k
            inp = tuple(toks[end - L - 1:end - 1])
            windows.append((inp, len(inp) - k, toks[end - k:end]))
            done = end
        total = 0.0
        for b in range(0, len(windows), self.batch_size):
            batch = windows[b:b + self.batch_size]
            wanted = [[(w[1] + j, t) for j, t in enumerate(w[2])] for w in batch]
            for sc in self._score([w[0] for w in batch], wanted):
                total += sum(lp for lp, _ in sc.values())
        return total, len(toks)

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_many(self, prompts: list[str | list[int]], until: list[str] = (), max_new_tokens: int = 256,
                      progress: bool = True) -> list[str]:
        """Greedy continuations (phiforge.generate, batched), each cut before the first `until` string or a stop
        token, as lm-eval's generate_until returns them."""
        from phiforge.fast import prepare_for_inference
        from phiforge.generate import generate
        from phiforge.sample import GenerationConfig

        prepare_for_inference(self.model)  # the engine's kernels (bf16 on CPU), as `phiforge generate` loads them
        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        ids = [list(p) if isinstance(p, list) else self.prompt_ids(p) for p in prompts]
        ids = [x[-(self.max_length - max_new_tokens):] for x in ids]  # left-truncate like lm-eval
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=tuple(until))
        out = []
        for b in tqdm(range(0, len(ids), self.batch_size), desc="generate", disable=not progress, leave=False):
            out += [r.text for r in generate(self.model, self.tok, ids[b:b + self.batch_size], cfg)]
        return [_cut(t, until) for t in out]

    def generate(self, prompt: str | list[int], until: list[str] = (), max_new_tokens: int = 256) -> str:
        return self.generate_many([prompt], until, max_new_tokens, progress=False)[0]

    def chat(self, messages: list[dict], max_new_tokens: int = 1024) -> str:
        prompt = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(list(self.tok.encode(prompt)), (), max_new_tokens)


def _cut(text: str, until) -> str:
    hits = [text.find(s) for s in until if s and s in text]
    return text[:min(hits)] if hits else text
