"""`phiforge export gguf MODEL --type f32|f16|q8_0|q4_0|q4_k_m --out FILE`

    phiforge export gguf runs/demo/final --type q4_k_m --out runs/demo/model-q4_k_m.gguf
    llama-cli -m runs/demo/model-q4_k_m.gguf -p "Once upon a time"     # or: ollama create demo -f Modelfile

MODEL is an HF-style folder with a tokenizer (a phiforge-quantized folder works too: it is dequantized first).
An Ollama `Modelfile` (chat template, stop tokens, context, sampling parameters) is written beside the GGUF.
"""
from __future__ import annotations

import sys

from phiforge.utils import ArgumentParser, UserError, atomic_write_text, check_writable

FORMATS = ("gguf",)


def main(argv: list[str] | None = None) -> int:
    from phiforge.export.gguf import TYPES, export_gguf

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in FORMATS and not argv[0].startswith("-"):
        raise UserError(f"unsupported export format {argv[0]!r}; supported: {', '.join(FORMATS)} "
                        "(usage: phiforge export gguf MODEL --type q4_k_m --out FILE)")
    ap = ArgumentParser(prog="phiforge export", description="Export a model for llama.cpp / Ollama.")
    ap.add_argument("format", choices=FORMATS)
    ap.add_argument("model", help="HF model folder with tokenizer, or a phiforge quantized folder")
    ap.add_argument("--type", default="f16", help=f"one of {', '.join(TYPES)}")
    ap.add_argument("--out", required=True, help="output .gguf file")
    ap.add_argument("--name", default=None, help="general.name (default: the folder name)")
    args = ap.parse_args(argv)
    if args.type not in TYPES:
        raise UserError(f"unsupported GGUF type {args.type!r}; choose one of {', '.join(TYPES)}")
    check_writable(args.out)
    from pathlib import Path

    from phiforge import load

    model, tok = load(args.model, dtype="float32")
    path = export_gguf(model, tok, args.out, args.type, name=args.name or Path(args.model).name)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    write_modelfile(path, tok, model.config.max_position_embeddings, args.model)
    return 0


def write_modelfile(gguf: "Path", tok, context: int, model_dir: str) -> None:
    """OUT's folder/Modelfile for `ollama create` (phiforge/export/modelfile.py says what goes in it)."""
    from phiforge.export.modelfile import modelfile_text, sampling_parameters

    modelfile = gguf.with_name("Modelfile")
    text, templated = modelfile_text(gguf.name, tok, context, sampling_parameters(model_dir))
    atomic_write_text(modelfile, text)
    print(f"wrote {modelfile} (ollama create NAME -f {modelfile})" + ("" if templated else
          "; it has no TEMPLATE: the chat template is not the Phi-3 turn format, add one by hand"))


if __name__ == "__main__":
    from phiforge.utils import run_main

    raise SystemExit(run_main(main, sys.argv[1:]))
