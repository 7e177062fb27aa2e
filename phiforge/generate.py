"""Single-stream inference: static KV cache, exact LongRoPE, optional torch.compile, streaming; `phiforge generate`.

    phiforge generate runs/demo/final --prompt "Once upon a time" --max-new-tokens 64
    phiforge generate microsoft/Phi-3-mini-4k-instruct --chat --prompt "Hi!" --temperature 0.7 --seed 1 --dtype bfloat16
    python -m phiforge.generate tiny-folder --prompt "Hello" --stop "." --threads 2

Layers, small to large (each one calls only the one below it):

1. phiforge.step: one model call over a static `KVCache` (prefill, decode_one_token, row/slot views); continuous
   batching (phiforge.batch) is built on it too.
2. `stream_generate(model, tokenizer, prompts, config)`: a generator of `Event`s (token id, text delta, finish
   reason). One prompt runs the single-stream loop below (one cache row, no batching); a list of prompts runs as one
   batch on `batch.BatchState`, whose rows give exactly the tokens of the prompts run one at a time.
3. `generate(...)`: the final `GenerationResult`s.  4. `main(argv)`: the CLI.  `phiforge chat` calls 2.

Sampling, penalties, detokenization and stop strings are phiforge.sample's (`Sequence.choose` / `Sequence.accept`).
Kernel swaps (the bf16 GEMV on CPU) are a load-time step, `phiforge.fast.prepare_for_inference(model)`,
that the CLIs and the server call; this module never changes the model.

LongRoPE policies (`GenerationConfig.rope_policy`), for models with rope_scaling (short/long factor sets):

* "dynamic" (default, = transformers): a model call uses the long factors iff the sequence's total length (the
  tokens seen so far, including the one being fed) exceeds original_max_position_embeddings. A prompt longer than
  that is prefilled (every chunk) with long factors. When generation first crosses the boundary, the sequence's
  whole cache is recomputed with long factors (one re-prefill, like Phi3ForCausalLM.prepare_inputs_for_generation),
  so every step equals a full forward pass over the sequence so far.
* "fixed": the factors are chosen once from the maximum length (prompt + max_new_tokens) and never change: no
  re-prefill, but a sequence that ends up short was run with long factors, which differs from transformers and from a
  full forward pass of the shorter sequence.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Iterator

import torch

from phiforge.fast import prepare_for_inference
from phiforge.sample import Event, GenerationConfig, Sequence
from phiforge.step import CacheViews, compact_row, compiled, compiled_cache_len, decode_one_token, prefill, prefill_ring
from phiforge.utils import ArgumentParser, UserError

DECODE_BUCKET = 64  # a decode step attends to slots [0, cursor + 1) rounded up to a multiple of this


# ----------------------------------------------------------------------------------------------------------------
# One stream (a single prompt: one cache row, no batching)


class _Stream:
    """One sequence on its own cache row: the cursor (next slot a decode step writes) equals the tokens cached."""

    def __init__(self, model, seq: Sequence, max_len: int, compile: bool):
        self.model, self.seq, self.cfg, self.max_len = model, seq, model.config, max_len
        self.window = self.cfg.sliding_window
        self.cache = model.make_cache(1, max_len)
        self.views = CacheViews(self.cache, max_len)
        self.decode_model = compiled(model) if compile else model
        self.compiled, self.cursor = compile, 0

    def next_logits(self) -> torch.Tensor | None:
        """fp32 logits [V] of the next token (prefilling the whole sequence first when the LongRoPE regime changed);
        None when the sequence no longer fits the cache (it has then finished with "length")."""
        seq = self.seq
        need_long = seq.needs_long(self.cfg)
        if seq.n_cached == 0 or need_long != seq.long:
            seq.long = need_long  # first prefill, or the LongRoPE switch: recompute the whole cache
            return self._prefill()
        return self._decode()

    def _compact(self) -> None:
        keep = self.cache.pos[0] >= 0
        if self.window is not None:  # keys no future query can see
            keep &= self.cache.pos[0] >= len(self.seq.tokens) - 1 - self.window
        self.cursor = compact_row(self.cache, 0, keep)

    def _prefill(self) -> torch.Tensor | None:
        seq, dev = self.seq, self.model.device
        self.cache.pos[0].fill_(-1)
        seq.n_cached, self.cursor, T = 0, 0, len(seq.tokens)
        if T > self.max_len:
            if self.window is None:
                seq.finish("length")
                return None
            logits = prefill_ring(self.model, self.views(0, 1, self.max_len), self.cache.pos[0], seq.tokens,
                                  self.window, seq.config.prefill_chunk, seq.long)
            seq.n_cached = T
            self._compact()
            return logits
        ids = torch.tensor([seq.tokens], device=dev)
        positions = torch.arange(T, device=dev)[None]
        logits = prefill(self.model, ids, positions, self.views(0, 1, T), 0, seq.config.prefill_chunk, seq.long)
        seq.n_cached, self.cursor = T, T
        return logits[0]

    def _decode(self) -> torch.Tensor | None:
        seq, dev = self.seq, self.model.device
        if self.cursor >= self.max_len:
            self._compact()
            if self.cursor >= self.max_len:  # no slot left to free (no window)
                seq.finish("length")
                return None
        slot = torch.tensor([self.cursor], device=dev)
        ids = torch.tensor([seq.tokens[-1]], device=dev)
        positions = torch.tensor([len(seq.tokens) - 1], device=dev)
        # compiled: one static shape (the whole cache), so the graph is compiled once
        view = self.views(0, 1, self.max_len if self.compiled else self.cursor + 1)
        logits = decode_one_token(self.decode_model, ids, positions, view, slot, long_rope=seq.long)
        seq.n_cached = len(seq.tokens)
        self.cursor += 1
        return logits[0]


def _stream_one(model, tokenizer, prompt: list[int], config: GenerationConfig, max_len: int,
                compile: bool) -> Iterator[Event]:
    """The Events of one prompt on a cache of max_len slots: model call, choose, accept, until it finishes."""
    seq = Sequence.start(prompt, config, tokenizer, model.config, model.device, n_decode_skip=1 if compile else 0)
    window = model.config.sliding_window
    if len(seq.prompt_ids) > max_len and window is None:
        raise UserError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the cache of {max_len} slots")
    stream = _Stream(model, seq, max_len, compile)
    while not seq.finished:
        with torch.inference_mode():
            logits = stream.next_logits()
            if logits is None:
                return
            tok = seq.choose(logits)
        # the token would need slot max_len: no window to evict from, so the sequence ends here ("length")
        ev = seq.accept(tok, time.perf_counter(), cache_full=window is None and len(seq.tokens) >= max_len)
        ev.logits = logits
        yield ev


# ----------------------------------------------------------------------------------------------------------------
# Layers 2 and 3: stream_generate (one stream, or a batch of prompts) and generate


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
    if len(batch) == 1:
        yield from _stream_one(model, tokenizer, batch[0], config, max_len, compile)
        return
    from phiforge.batch import BatchState  # several prompts: one batch, rows of one cache

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
    prepare_for_inference(model)
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
    """--prompt TEXT, --prompt - (stdin) or --prompt-file FILE, as llama.cpp's -p / -f. An empty file or stdin is
    refused (an empty --prompt "" stays allowed: it generates from BOS, as llama.cpp does)."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
        if not text:
            raise UserError(f"--prompt-file {args.prompt_file} is empty")
        return text
    if args.prompt == "-":
        text = sys.stdin.read()
        if not text:
            raise UserError("--prompt -: standard input was empty")
        return text
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
    if not prompt:  # an empty text with a tokenizer that adds nothing: start from BOS (else EOS), as lm-eval does
        prompt = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
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
    from phiforge.utils import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))