"""Show what a model is: resolved config, parameter count, memory per dtype, tokenizer, rendered chat template.

    phiforge inspect phi-3-mini-4k
    phiforge inspect runs/demo/final
"""
from __future__ import annotations

import json
from pathlib import Path

from phiforge import models
from phiforge.utils import ArgumentParser, UserError

SAMPLE = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is 2 + 2?"},
          {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3 + 3?"}]


def describe(cfg) -> dict:
    n = cfg.num_params()
    return {
        "config": {k: v for k, v in cfg.to_hf().items() if k not in ("rope_scaling",)},
        "rope_scaling": None if cfg.rope_scaling is None else {
            "type": cfg.rope_scaling["type"], "factors": len(cfg.rope_scaling["short_factor"]),
            "short_factor[:3]": cfg.rope_scaling["short_factor"][:3],
            "long_factor[:3]": cfg.rope_scaling["long_factor"][:3]},
        "derived": {"head_dim": cfg.head_dim, "rotary_dim": cfg.rotary_dim,
                    "gqa_group": cfg.num_attention_heads // cfg.num_key_value_heads,
                    "attention": "full causal" if cfg.sliding_window is None or
                    cfg.sliding_window >= cfg.max_position_embeddings
                    else f"sliding window: {cfg.sliding_window + 1} keys incl. self"},
        "parameters": n,
        "memory_GiB": {"fp32": n * 4 / 2**30, "bf16": n * 2 / 2**30, "int8": n / 2**30, "int4": n / 2 / 2**30},
    }


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="phiforge inspect", description=__doc__.splitlines()[0])
    ap.add_argument("model", help=f"model folder, Hub repo id, or preset ({', '.join(models.presets())})")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)

    tok, qc = None, None
    if args.model in models.presets() and not Path(args.model).exists():
        cfg = models.config_from_name(args.model)
    else:
        from phiforge.checkpoint import read_config, resolve_path
        from phiforge.tokenizer import Tokenizer
        from phiforge.checkpoint import check_shapes, read_shapes
        folder = resolve_path(args.model)
        cfg = read_config(folder)
        expected = None
        if (folder / "quant_config.json").exists():  # a `phiforge quantize` folder: its own tensor layout
            from phiforge.quant import quantized_shapes, read_quant_config
            qc = read_quant_config(folder)
            expected = quantized_shapes(cfg, qc)
        check_shapes(cfg, read_shapes(folder), str(folder), expected)  # names and shapes, from the headers only
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
            tok = Tokenizer.from_folder(folder)
    info = describe(cfg)
    if qc is not None:
        info["quantization"] = {k: qc.get(k) for k in ("bits", "group_size", "symmetric", "method", "embed_bits")}
    if tok is not None:
        info["tokenizer"] = {"vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos": tok.eos_token,
                             "stop_ids": sorted(tok.stop_ids), "end_id": tok.end_id}
        info["chat_template_sample"] = tok.apply_chat_template(SAMPLE, add_generation_prompt=True)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {args.model}")
    for k, v in info["config"].items():
        print(f"  {k:<34} {v}")
    print(f"  {'rope_scaling':<34} {info['rope_scaling']}")
    for k, v in info["derived"].items():
        print(f"  {k:<34} {v}")
    print(f"parameters: {info['parameters']:,}")
    print("memory (weights): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in info["memory_GiB"].items()))
    if qc is not None:
        q = info["quantization"]
        how = (f"group {q['group_size']}, {'symmetric' if q['symmetric'] else 'asymmetric'}" if q["bits"] == 4
               else "symmetric per output channel")  # int8 has no groups and is always symmetric
        print(f"quantization: int{q['bits']}, {how}, {q['method']}"
              + (", embeddings int8" if q["embed_bits"] == 8 else ""))
    if tok is not None:
        print(f"tokenizer: {tok!r}")
        print("chat template (sample conversation, generation prompt):")
        print(info["chat_template_sample"])
    else:
        print("tokenizer: none (preset or folder without tokenizer files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
