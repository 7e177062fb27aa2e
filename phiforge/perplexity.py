"""`phiforge perplexity MODEL --data FILE [--reference MODEL]`: strided-window perplexity, and the mean KL
divergence KL(reference || model) of next-token distributions, e.g. to measure what quantization cost.

    phiforge perplexity runs/demo/final --data ../shared/data/wikitext
    phiforge perplexity runs/demo/int4 --data test.txt --reference runs/demo/final --ctx 512 --stride 256
    phiforge perplexity runs/tinystories/train/final --data ../shared/data/tinystories/tinystories_10klines_chunk.txt.gz \
        --docs eot --last-docs 87 --rolling --ctx 256       # the TinyStories held-out rule (recipes/tinystories.yaml)

Windows follow the transformers perplexity guide (docs "Perplexity of fixed-length models"): each window of
--ctx tokens starts --stride after the previous one and scores only the tokens no earlier window scored, so every
token is scored once with up to ctx - stride tokens of context. --rolling instead cuts the tokens into disjoint
windows as lm-eval's `loglikelihood_rolling` and nanoGPT's validation loss do: window k reads tokens [k*ctx, (k+1)*ctx)
and predicts the token after each, so every token after the first is scored exactly once and no context is carried
from one window to the next. MODEL may be a phiforge quantized folder.

--docs SEP reads the file as documents (separated as `phiforge tokenize --text-sep` separates them), encodes each
alone without special tokens and scores the stream `EOS d1 EOS d2 ... dn EOS`; bits per byte then count one byte per
EOS besides the documents' UTF-8 bytes. --last-docs N keeps only the last N documents (a held-out tail).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from phiforge.data.io import SEPARATORS, read_documents, read_text
from phiforge.scoring import TokenScores, score_hidden, score_logits
from phiforge.utils import ArgumentParser, UserError

def encode_prefix(tok, path: str, max_tokens: int) -> tuple[list[int], int | None]:
    """(ids, bytes) for the first max_tokens (+1) tokens of the data, reading and encoding only a prefix: a few
    characters per token, doubled until enough tokens come out or the data ends. bytes is None when the data was
    cut (the ids then stand for no whole text)."""
    chars = 8 * (max_tokens + 64)
    while True:
        text = read_text(path, chars)
        ids = tok.encode(text, add_special_tokens=True)
        # the margin keeps the cut far from the prefix's end, where a token may differ from the whole text's
        if len(ids) > max_tokens + 32:
            return ids[:max_tokens + 1], None
        if len(text) < chars:  # the whole data was read
            return ids, len(text.encode("utf-8"))
        chars *= 2


@torch.no_grad()
def evaluate(model, ids: list[int], ctx: int, stride: int, reference=None, max_tokens: int | None = None) -> dict:
    """{"ppl", "nll", "tokens", "kl" (if reference), "top1_agree" (if reference)} over strided windows."""
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UserError("the data has fewer than 2 tokens")
    if not 0 < stride <= ctx:
        raise UserError(f"--stride must be in 1..ctx ({ctx}), not {stride}")
    data = torch.tensor(ids, dtype=torch.long)
    nll, ref_nll, kl, agree, n, prev_end = 0.0, 0.0, 0.0, 0, 0, 0
    bar = _progress(len(ids) - 1)
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + ctx, len(ids))
        new = end - max(prev_end, begin + 1)  # targets not yet scored (position 0 has no prediction)
        window = data[begin:end][None]
        targets = window[0, -new:]
        s = _score_last(model, window, new, keep_rows=reference is not None)  # predictions for the last `new`
        nll += float(-s.logprob.sum())
        if reference is not None:
            r = _score_last(reference, window, new, keep_rows=True)
            ref_nll += float(-r.logprob.sum())
            kl += float((r.rows.exp() * (r.rows - s.rows)).sum())
            agree += int((r.rows.argmax(-1) == s.rows.argmax(-1)).sum())
        n += new
        bar.update(new)
        prev_end = end
        if end == len(ids):
            break
    bar.close()
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
    if reference is not None:
        out.update(kl=kl / n, top1_agree=agree / n, ref_ppl=math.exp(ref_nll / n), ref_nll=ref_nll / n)
    return out


def _score_last(model, window: torch.Tensor, new: int, keep_rows: bool = False) -> TokenScores:
    """Scores of the last `new` tokens of window (1, T), each predicted from the tokens before it in the window."""
    hidden = model(window[:, :-1].to(model.device), return_hidden=True)[0, -new:]  # (new, C)
    targets = window[0, -new:].to(model.device)
    if keep_rows:  # KL needs the whole distributions
        return score_logits(model.head(hidden), targets, keep_rows=True)
    return score_hidden(model, hidden, targets)


def _progress(total: int):
    """Scored tokens, on stderr: a large file takes minutes on a CPU."""
    from tqdm import tqdm

    return tqdm(total=total, desc="perplexity", unit="tok", file=sys.stderr, leave=False, mininterval=1.0)


@torch.no_grad()
def evaluate_rolling(model, ids: list[int], ctx: int, batch_size: int = 16) -> dict:
    """{"nll" (total nats), "tokens"} over disjoint windows: inputs ids[k*ctx:(k+1)*ctx], targets shifted by one.
    Full windows go through the model `batch_size` at a time; the last, shorter one alone."""
    if len(ids) < 2:
        raise UserError("the data has fewer than 2 tokens")
    if ctx < 1:
        raise UserError(f"--ctx must be >= 1, not {ctx}")
    data = torch.tensor(ids, dtype=torch.long)
    n_full = (len(ids) - 1) // ctx
    x_full = data[:n_full * ctx].view(n_full, ctx)
    y_full = data[1:n_full * ctx + 1].view(n_full, ctx)
    pieces = [(x_full[i:i + batch_size], y_full[i:i + batch_size]) for i in range(0, n_full, batch_size)]
    if n_full * ctx < len(ids) - 1:
        pieces.append((data[n_full * ctx:-1][None], data[n_full * ctx + 1:][None]))
    nll, n = 0.0, 0
    bar = _progress(len(ids) - 1)
    for x, y in pieces:
        logits = model(x)  # (b, T, V); model may be any callable (pretrain passes one under autocast)
        nll += float(-score_logits(logits.flatten(0, 1), y.flatten().to(logits.device)).logprob.sum())
        n += y.numel()
        bar.update(y.numel())
    bar.close()
    return {"nll": nll, "tokens": n}


def read_last_documents(path: str, sep: str, last: int | None = None) -> list[str]:
    """The documents of a text file, split as `phiforge tokenize --text-sep SEP` splits them; with `last`, only the
    last that many (a held-out tail), and an error when the file holds fewer."""

    docs = list(read_documents(Path(path), "text", sep))
    if last:
        if last > len(docs):
            raise UserError(f"--last-docs {last}: {path} holds only {len(docs)} documents")
        docs = docs[-last:]
    return docs


def document_stream(tok, docs: list[str]) -> tuple[list[int], int]:
    """`EOS d1 EOS d2 ... dn EOS` (each document encoded alone, no special tokens) and the bytes it stands for: the
    documents' UTF-8 bytes plus one per scored EOS."""
    if tok.eos_id is None:
        raise UserError("--docs needs a tokenizer with an EOS token to separate the documents")
    ids = [tok.eos_id]
    for d in docs:
        ids += tok.encode(d, add_special_tokens=False) + [tok.eos_id]
    return ids, sum(len(d.encode("utf-8")) for d in docs) + len(docs)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge perplexity", description="Strided-window perplexity (+ KL vs a "
                                 "reference model).")
    ap.add_argument("model", help="HF model folder or phiforge quantized folder (needs a tokenizer)")
    ap.add_argument("--data", required=True, help="text file or folder (.txt, .gz, .jsonl, .parquet)")
    ap.add_argument("--reference", default=None, help="model whose distributions KL is measured against")
    ap.add_argument("--ctx", type=int, default=None, help="window length (default: min(1024, model max))")
    ap.add_argument("--stride", type=int, default=None, help="window stride (default: ctx / 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the data")
    ap.add_argument("--rolling", action="store_true", help="disjoint --ctx windows, every token after the first "
                    "scored once with no carried context (lm-eval loglikelihood_rolling); --stride is ignored")
    ap.add_argument("--docs", default=None, choices=SEPARATORS,
                    help="score --data as documents joined by EOS (see above) with this separator")
    ap.add_argument("--last-docs", type=int, default=None, metavar="N", help="with --docs: only the last N")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    from phiforge import load
    from phiforge.utils import atomic_write_json, check_writable

    # every check on the arguments before a model is loaded
    if args.last_docs is not None and (args.docs is None or args.last_docs < 1):
        raise UserError("--last-docs needs --docs and a count >= 1")
    if args.rolling and args.reference:
        raise UserError("--reference is measured on strided windows; drop --rolling")
    if args.json:
        check_writable(args.json, flag="--json")

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype)
    if tok is None:
        raise UserError(f"{args.model} has no tokenizer; perplexity needs one to tokenize --data")
    reference = None
    if args.reference:
        reference, ref_tok = load(args.reference, dtype=args.dtype)
        if ref_tok is not None and ref_tok.vocab_size != tok.vocab_size:
            raise UserError("--reference has a different tokenizer; KL needs the same vocabulary")
        reference.eval()
    ctx = args.ctx or min(1024, model.config.max_position_embeddings)
    if args.docs:
        ids, nbytes = document_stream(tok, read_last_documents(args.data, args.docs, args.last_docs))
    elif args.max_tokens:  # read and encode only what is scored: a large file would take minutes
        ids, nbytes = encode_prefix(tok, args.data, args.max_tokens)
    else:
        text = read_text(args.data)
        # as `tokenizer(text)`: Phi-3's leads with <s>
        ids, nbytes = tok.encode(text, add_special_tokens=True), len(text.encode("utf-8"))
    if args.rolling:
        if args.max_tokens:
            ids = ids[:args.max_tokens + 1]
            nbytes = None  # a cut stream no longer stands for the whole text's bytes
        res = evaluate_rolling(model.eval(), ids, ctx)
        res = {"nll": res["nll"] / res["tokens"], "tokens": res["tokens"], "ppl": math.exp(res["nll"] / res["tokens"])}
    else:
        res = evaluate(model.eval(), ids, ctx, args.stride or max(1, ctx // 2), reference, args.max_tokens)
        if args.max_tokens and args.max_tokens < len(ids):
            nbytes = None
    if nbytes:
        res["bits_per_byte"] = res["nll"] * res["tokens"] / math.log(2) / nbytes
        res["bytes"] = nbytes
    res.update(model=args.model, data=args.data, reference=args.reference, ctx=ctx)
    line = f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens"
    if "bits_per_byte" in res:
        line += f", {res['bits_per_byte']:.4f} bits per byte"
    if reference is not None:
        change = 100.0 * (res["ppl"] / res["ref_ppl"] - 1.0)
        line += (f"; reference perplexity {res['ref_ppl']:.4f} (model {change:+.2f}%); KL(reference || model) "
                 f"{res['kl']:.5f} nats/token, top-1 agreement {res['top1_agree']:.3f}")
    print(line)
    if args.json:
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    from phiforge.utils import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
