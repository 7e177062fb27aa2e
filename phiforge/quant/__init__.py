"""Weight-only int8 / int4 quantization as a module swap after the model is built (the model files never mention it).

    quantize(model, bits=4, group_size=32)      # in place; save_quantized(model, out, tokenizer); phiforge.load(out)

References (read, not copied):
  * gpt-fast quantize.py (WeightOnlyInt4Linear / WeightOnlyInt8Linear, group-wise affine int4)
  * GPTQ: Frantar et al. 2022, arXiv:2210.17323, Algorithm 1, and IST-DASLab/gptq gptq.py (lazy block updates,
    Cholesky of the inverse Hessian)

Formats. int8: per output channel, symmetric, w = s[n] * q[n, k], q in -127..127. int4: per group of G input
weights, w = s * q + m with q in 0..15 (asymmetric: m = -zero * s; symmetric: m = -8 s), s and m stored fp16,
codes packed two per byte in 32-weight blocks (see `pack_int4`). A quantized checkpoint is model.safetensors with
those buffers plus quant_config.json naming every swapped module. In memory an Int4Linear holds the same codes in
our kernel's tiled layout (`tile_int4`), converted once when it is made or loaded (quant/checkpoint.py).

Layout of the package: formats.py (primitives, the int4 layouts, the modules), gptq.py, checkpoint.py (save/load);
this file chooses which modules get which format and runs the swap; stream.py quantizes a checkpoint folder shard
by shard without building the float model (RTN; what `phiforge quantize` runs on a folder); cli.py is
`phiforge quantize`.

Deviations from the GPTQ paper, on purpose:
  1. Blocks are quantized in order with inputs from the already-quantized earlier blocks (as the paper), but the
     linears inside one block share one calibration pass (their Hessians come from the block's fp inputs).
  2. No activation reordering (act-order); group parameters are chosen when the group's first column is reached.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from phiforge.quant.checkpoint import file_state, load_quantized, quantized_shapes, read_quant_config, save_quantized
from phiforge.quant.formats import (GROUP_SIZES, Int4Linear, Int8Embedding, Int8Linear, dequantize_int4, empty_module,
                                    int4_codes, int4_params, pack_int4, quantize_int4, quantize_int8, rtn_module,
                                    tile_int4, unpack_int4, untile_int4)
from phiforge.quant.gptq import gptq_int4, gptq_swap
from phiforge.utils import UserError, progress, set_module

__all__ = ["GROUP_SIZES", "DEFAULT_GROUP_SIZE", "Int4Linear", "Int8Embedding", "Int8Linear", "quantize",
           "save_quantized", "load_quantized", "read_quant_config", "quantized_shapes", "file_state",
           "quantize_int8", "quantize_int4", "dequantize_int4", "int4_params", "int4_codes", "pack_int4",
           "unpack_int4", "tile_int4", "untile_int4", "gptq_int4", "empty_module", "rtn_module",
           "fitting_group_sizes", "default_group_size", "plan"]

# The group size used when none is given, where it divides the model's in_features (gpt-fast's and GPTQ's default);
# otherwise the largest smaller one that does (the recipe's model has intermediate_size 704 = 11 x 64).
DEFAULT_GROUP_SIZE = 128

# ----------------------------------------------------------------------------------------------------------------
# Which modules get which format


def _linears(model) -> dict[str, nn.Linear]:
    """The linears quantization replaces: every block linear and the LM head, less those whose leaf name the model
    lists in `keep_float` (PhiMoE's router: see there why)."""
    keep = tuple(getattr(model, "keep_float", ()))
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (n.startswith("model.layers.") or n == "lm_head")
            and n.rpartition(".")[2] not in keep}


def fitting_group_sizes(model) -> list[int]:
    """The offered int4 group sizes (GROUP_SIZES) that divide the in_features of every linear int4 replaces."""
    ins = {m.in_features for m in _linears(model).values()}
    return [g for g in GROUP_SIZES if all(k % g == 0 for k in ins)]


def default_group_size(model) -> int:
    """DEFAULT_GROUP_SIZE, or the largest smaller offered size that divides every in_features of this model."""
    fits = [g for g in fitting_group_sizes(model) if g <= DEFAULT_GROUP_SIZE]
    if not fits:
        ins = sorted({m.in_features for m in _linears(model).values()})
        raise UserError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides every in_features of this "
                        f"model ({', '.join(map(str, ins))}); use --bits 8")
    return fits[-1]


def _targets(model, bits: int, group_size: int, embed_bits: int | None) -> dict[str, dict]:
    """name -> {"kind": int4|int8|int8_embedding, ...}: every block linear at `bits`; lm_head at `bits` (or at 8
    with embed_bits=8); the embedding stays float unless embed_bits=8."""
    specs = {}
    for name, mod in _linears(model).items():
        if name != "lm_head":
            specs[name] = _linear_spec(model, mod, bits, group_size, name)
    specs["lm_head"] = _linear_spec(model, model.lm_head, 8 if embed_bits == 8 else bits, group_size, "lm_head")
    if embed_bits == 8:
        specs["model.embed_tokens"] = {"kind": "int8_embedding"}
    elif embed_bits is not None:
        raise UserError(f"--embed-bits must be 8 or omitted, not {embed_bits}")
    return specs


def _linear_spec(model, mod: nn.Linear, bits: int, group_size: int, name: str) -> dict:
    if bits == 8:
        return {"kind": "int8"}
    if bits != 4:
        raise UserError(f"--bits must be 4 or 8, not {bits}")
    if mod.in_features % group_size or group_size % 32 or group_size > 256:
        fits = fitting_group_sizes(model)  # the hint names only sizes that work for this model
        hint = (f"use --group-size {' or '.join(map(str, fits))}, which divide every in_features of this model" if fits
                else "no offered group size divides every in_features of this model; use --bits 8")
        raise UserError(f"{name}: in_features {mod.in_features} is not divisible by group size {group_size} ({hint})")
    return {"kind": "int4", "group_size": group_size}


# ----------------------------------------------------------------------------------------------------------------
# quantize(model)


def plan(model, bits: int = 4, group_size: int | None = None, symmetric: bool = False, method: str = "rtn",
         embed_bits: int | None = None) -> dict:
    """The quant_config for `model` (which may live on the meta device): every swapped module's format under
    "modules", and how. Shared by quantize() and the shard-by-shard stream.quantize_folder, so both choose alike."""
    if group_size is None:
        group_size = default_group_size(model) if bits == 4 else DEFAULT_GROUP_SIZE
    specs = _targets(model, bits, group_size, embed_bits)
    if method not in ("rtn", "gptq"):
        raise UserError(f"unknown method {method!r}: use rtn or gptq")
    return {"format": "phiforge-quant", "version": 1, "bits": bits, "group_size": group_size,
            "symmetric": symmetric, "method": method if bits == 4 else "rtn",  # int8 is always RTN
            "embed_bits": embed_bits, "modules": specs}


@torch.no_grad()
def quantize(model, bits: int = 4, group_size: int | None = None, symmetric: bool = False, method: str = "rtn",
             calib: torch.Tensor | None = None, embed_bits: int | None = None, calib_batch: int = 8):
    """Swap the model's linears (and optionally the embedding) for quantized modules, in place; returns the model.
    method "gptq" needs calib: token ids [n_samples, T]. group_size None: default_group_size(model). The swap is
    recorded in model.quant_config."""
    qc = plan(model, bits, group_size, symmetric, method, embed_bits)
    specs = qc["modules"]
    if method == "gptq" and bits == 4:  # block order: the Phi-3 layout (model.model.layers, then lm_head)
        if calib is None or calib.numel() == 0:
            raise UserError("GPTQ needs calibration text: pass --calib FILE")
        model.float()  # Hessians and error feedback in fp32
        bar = progress(total=len(model.model.layers) + 1, desc="GPTQ", unit="block")  # minutes on a real model
        for i, blk in enumerate(model.model.layers):
            names = [n for n in specs if n.startswith(f"model.layers.{i}.")]
            gptq_swap(model, specs, blk, names, calib, calib_batch, symmetric)
            bar.update()
        gptq_swap(model, specs, model.lm_head, ["lm_head"], calib, calib_batch, symmetric)
        bar.update()
        bar.close()
        rest = [n for n in specs if n != "lm_head" and not n.startswith("model.layers.")]
    else:
        rest = list(specs)
    for name in rest:
        set_module(model, name, rtn_module(specs[name], model.get_submodule(name), symmetric))
    model.quant_config = qc
    return model
