"""`phiforge perplexity MODEL --data FILE [--reference MODEL]`: strided-window perplexity, and the mean KL
divergence KL(reference || model) of next-token distributions, e.g. to measure what quantization cost.

    phiforge perplexity runs/demo/final --data ../shared/data/wikitext
    phiforge perplexity runs/demo/int4 --data test.txt --reference runs/demo/final --ctx 512 --stride 256

Windows follow the transformers perplexity guide (docs "Perplexity of fixed-length models"): each window of
--ctx tokens starts --stride after the previous one and scores only the tokens no earlier window scored, so every
token is scored once with up to ctx - stride tokens of context. MODEL may be a phiforge quantized folder.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from phiforge.utils import UserError

TEXT_SUFFIXES = (".txt", ".gz", ".jsonl", ".json", ".parquet", ".md", ".raw", ".tokens")


def _read_one(p: Path) -> str:
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if "text" not in table.column_names:
            raise UserError(f"{p} has no 'text' column (columns: {table.column_names})")
        return "\n".join(t for t in table.column("text").to_pylist() if t)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        if ".jsonl" in p.suffixes:
            return "\n".join(json.loads(line).get("text", "") for line in f if line.strip())
        return f.read()


def read_text(path: str) -> str:
    """A text file (.txt/.gz/.jsonl with 'text'/.parquet with 'text'), or a folder of them (prefers files whose
    name contains 'test', as in wikitext's test split)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and any(s in TEXT_SUFFIXES for s in f.suffixes))
        test = [f for f in files if "test" in f.name]
        files = test or files
        if not files:
            raise UserError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return "\n".join(_read_one(f) for f in files)
    return _read_one(p)


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
    nll, kl, agree, n, prev_end = 0.0, 0.0, 0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + ctx, len(ids))
        new = end - max(prev_end, begin + 1)  # targets not yet scored (position 0 has no prediction)
        window = data[begin:end][None]
        logits = model(window[:, :-1]).float()[0, -new:]  # (new, V): predictions for the last `new` targets
        targets = window[0, -new:]
        logp = F.log_softmax(logits, dim=-1)
        nll += float(-logp.gather(1, targets[:, None]).sum())
        if reference is not None:
            ref_logp = F.log_softmax(reference(window[:, :-1]).float()[0, -new:], dim=-1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        n += new
        prev_end = end
        if end == len(ids):
            break
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
    if reference is not None:
        out.update(kl=kl / n, top1_agree=agree / n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="phiforge perplexity", description="Strided-window perplexity (+ KL vs a "
                                 "reference model).")
    ap.add_argument("model", help="HF model folder or phiforge quantized folder (needs a tokenizer)")
    ap.add_argument("--data", required=True, help="text file or folder (.txt, .gz, .jsonl, .parquet)")
    ap.add_argument("--reference", default=None, help="model whose distributions KL is measured against")
    ap.add_argument("--ctx", type=int, default=None, help="window length (default: min(1024, model max))")
    ap.add_argument("--stride", type=int, default=None, help="window stride (default: ctx / 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the data")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args(argv)
    from phiforge.quant import load_any
    from phiforge.utils import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_any(args.model, dtype=args.dtype)
    if tok is None:
        raise UserError(f"{args.model} has no tokenizer; perplexity needs one to tokenize --data")
    reference = None
    if args.reference:
        reference, ref_tok = load_any(args.reference, dtype=args.dtype)
        if ref_tok is not None and ref_tok.vocab_size != tok.vocab_size:
            raise UserError("--reference has a different tokenizer; KL needs the same vocabulary")
        reference.eval()
    ctx = args.ctx or min(1024, model.config.max_position_embeddings)
    ids = tok.encode(read_text(args.data), add_special_tokens=True)  # as `tokenizer(text)`: Phi-3's leads with <s>
    res = evaluate(model.eval(), ids, ctx, args.stride or max(1, ctx // 2), reference, args.max_tokens)
    res.update(model=args.model, data=args.data, reference=args.reference, ctx=ctx)
    line = f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens"
    if reference is not None:
        line += f"; KL(reference || model) {res['kl']:.5f} nats/token, top-1 agreement {res['top1_agree']:.3f}"
    print(line)
    if args.json:
        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    from phiforge.cli import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
