"""`phiforge quantize`: load a model, quantize it (RTN or GPTQ), write a folder `phiforge.load` reads back.

    phiforge quantize runs/demo/final --bits 4 --group-size 32 --out runs/demo/int4
    phiforge quantize runs/demo/final --bits 4 --group-size 32 --method gptq --calib corpus.txt --out runs/demo/gptq
    phiforge quantize runs/demo/final --bits 8 --out runs/demo/int8
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from phiforge import load
from phiforge.checkpoint import resolve_path
from phiforge.models import presets
from phiforge.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, default_group_size, quantize, save_quantized
from phiforge.quant.stream import folder_bytes, meta_model, quantize_folder
from phiforge.tokenizer import Tokenizer
from phiforge.utils import ArgumentParser, UserError, check_writable, run_main


def calibration_ids(tokenizer, path: str, n_samples: int = 128, seq_len: int = 512) -> torch.Tensor:
    """n_samples windows of seq_len tokens, evenly spread over the tokenized file."""
    from phiforge.data.io import read_text

    ids = tokenizer.encode(read_text(path))
    if len(ids) < seq_len + 1:
        raise UserError(f"{path}: only {len(ids)} tokens; calibration needs at least seq_len={seq_len} (--seq-len)")
    n = min(n_samples, len(ids) // seq_len)
    starts = torch.linspace(0, len(ids) - seq_len, n).long().tolist()
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge quantize", description="Weight-only int8/int4 quantization.")
    ap.add_argument("model", help="HF model folder (or a preset name)")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=None,
                    help=f"int4 group size: 32, 64, 128 or 256 (default: {DEFAULT_GROUP_SIZE}, or the largest "
                         "smaller one dividing every in_features of the model)")
    ap.add_argument("--symmetric", action="store_true", help="int4 symmetric (default asymmetric)")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--calib", default=None, help="GPTQ calibration text file (.txt, .gz, .jsonl, folder)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--embed-bits", type=int, default=None, help="8: keep embeddings and lm_head at int8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.group_size is not None and args.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {args.group_size}")
    check_writable(args.out, "dir")
    gptq = args.method == "gptq" and args.bits == 4
    # A folder is quantized shard by shard (stream.py: memory ~ one shard, not the float model); GPTQ runs
    # calibration forwards and a preset has no files, so those load the whole model.
    streaming = not gptq and not (args.model in presets() and not Path(args.model).exists())
    if streaming:
        folder = resolve_path(args.model)
        _, model = meta_model(folder)
        tok = Tokenizer.from_folder_or_none(folder)
    else:
        model, tok = load(args.model, dtype="float32")
    calib = None
    if gptq:
        if not args.calib:
            raise UserError("--method gptq needs --calib FILE (text to calibrate on)")
        if tok is None:
            raise UserError(f"{args.model} has no tokenizer; GPTQ calibration needs one")
        calib = calibration_ids(tok, args.calib, args.calib_samples, args.seq_len)
    group_size = args.group_size
    if group_size is None and args.bits == 4:
        group_size = default_group_size(model)
        if group_size != DEFAULT_GROUP_SIZE:
            print(f"quantize: group size {group_size}: the default {DEFAULT_GROUP_SIZE} does not divide every "
                  "in_features of this model", file=sys.stderr)
    how = (f"group {group_size}, {'symmetric' if args.symmetric else 'asymmetric'}, {args.method}" if args.bits == 4
           else "symmetric per output channel, rtn")
    print(f"quantizing {args.model}: {args.bits}-bit, {how}", file=sys.stderr)
    if streaming:
        quantize_folder(folder, args.out, args.bits, group_size, args.symmetric, args.embed_bits, tok)
    else:
        quantize(model.eval(), args.bits, group_size, args.symmetric, args.method, calib, args.embed_bits)
        save_quantized(model, args.out, tok)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, sys.argv[1:]))
