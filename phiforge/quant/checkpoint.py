"""Quantized folders: config.json + model.safetensors + quant_config.json (+ tokenizer), written by `phiforge
quantize` and read by phiforge.load. The int4 file format is the row layout (`pack_int4`, with scales and offsets
[N, K/G]); the modules hold our kernel's tiled layout, so saving untiles once and loading tiles once."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from phiforge.quant.formats import Int4Linear, empty_module, tile_int4
from phiforge.utils import UserError, atomic_write_json, set_module


def file_state(model, shapes_only: bool = False) -> dict:
    """model.state_dict() with every Int4Linear in the file format (qweight rows, scales, offsets instead of the
    tiles); shapes_only: their shapes (meta-device models)."""
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    state = {k: v for k, v in model.state_dict().items()
             if not (k.rpartition(".")[0] in int4 and k.rpartition(".")[2] in ("qweight", "sm"))}
    for n, m in int4.items():
        tensors = ({k: torch.empty(s, device="meta") for k, s in m.file_shapes().items()} if shapes_only
                   else m.file_tensors())
        state.update({_key(n, k): t for k, t in tensors.items()})
    return state


def _key(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _tile_file_int4(state: dict, names: list[str]) -> list[str]:
    """In place: each named int4 module's file tensors -> the tiles the module holds. Returns the absent keys."""
    absent = []
    for n in names:
        keys = [_key(n, leaf) for leaf in ("qweight", "scales", "offsets")]
        if not all(k in state for k in keys):
            absent += [k for k in keys if k not in state]
            for k in keys:  # a module with a tensor missing is reported, not half loaded
                state.pop(k, None)
            continue
        q, s, m = (state.pop(k) for k in keys)
        state[_key(n, "qweight")], state[_key(n, "sm")] = tile_int4(q, s.half(), m.half())
    return absent


SAFETENSORS_META = {"format": "pt", "quantization": "phiforge-quant"}


def save_quantized(model, folder, tokenizer=None) -> Path:
    """config.json + model.safetensors (quantized buffers and float params) + quant_config.json (+ tokenizer)."""
    from phiforge.checkpoint import save_atomic, write_folder_files

    qc = getattr(model, "quant_config", None)
    if qc is None:
        raise UserError("model is not quantized; call phiforge.quant.quantize(model, ...) first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_folder_files(folder, model.config, "float32", tokenizer)
    state = {k: v.detach().contiguous() for k, v in file_state(model).items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    save_atomic(state, folder / "model.safetensors", SAFETENSORS_META)
    atomic_write_json(folder / "quant_config.json", qc)
    return folder


def load_quantized(folder, dtype=torch.float32, device: str = "cpu"):
    """Inverse of save_quantized (and of stream.quantize_folder, whose output may be sharded): (model, tokenizer
    or None). The model is built on the meta device and takes the file's tensors as they are (assign), so loading
    needs the quantized size in memory, not the float model's (phi-3.5-MoE: ~23 GB at int4, not 168 GB fp32)."""
    from phiforge import models
    from phiforge.checkpoint import check_finite, read_config, read_state_dict, resolve_dtype
    from phiforge.tokenizer import Tokenizer

    folder = Path(folder)
    qc = read_quant_config(folder)
    dtype = resolve_dtype(dtype)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = models.build(cfg)
        for name, spec in qc["modules"].items():
            new = empty_module(spec, model.get_submodule(name))
            new.out_dtype = new.compute_dtype = dtype
            set_module(model, name, new)
    state = read_state_dict(folder)
    state = {k: (v.to(dtype) if v.is_floating_point() and not _is_quant_buffer(k, qc) else v) for k, v in state.items()}
    check_finite(state, str(folder))
    absent = _tile_file_int4(state, [n for n, spec in qc["modules"].items() if spec["kind"] == "int4"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    reported = {k.rpartition(".")[0] for k in absent}  # their in-memory tensors are missing as a consequence
    missing = absent + [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
                        and k.rpartition(".")[0] not in reported]
    if missing or unexpected:
        raise UserError(f"{folder}: quantized weights do not match quant_config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings and isinstance(model.head, torch.nn.Linear):  # a float head shares the embedding
        model.head.weight = model.embed.weight
    model.init_buffers()  # the rotary tables, which no file holds
    model.quant_config = qc
    return model.to(device).eval(), Tokenizer.from_folder_or_none(folder)


def read_quant_config(folder) -> dict:
    path = Path(folder) / "quant_config.json"
    try:
        qc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(qc, dict) or qc.get("format") != "phiforge-quant" or not isinstance(qc.get("modules"), dict):
        raise UserError(f"{path} is not a phiforge quantization config")
    return qc


def quantized_shapes(cfg, qc: dict) -> dict[str, tuple]:
    """Tensor name -> shape of the model.safetensors save_quantized writes for this config and quant_config, built
    on the meta device (no memory), so `inspect` can check a quantized folder from its headers alone."""
    from phiforge import models

    with torch.device("meta"):
        model = models.build(cfg)
        for name, spec in qc["modules"].items():
            try:
                set_module(model, name, empty_module(spec, model.get_submodule(name)))
            except (AttributeError, KeyError):
                raise UserError(f"quant_config.json names module {name!r}, which this config has not "
                                f"(or with a bad spec {spec})") from None
        return {k: tuple(v.shape) for k, v in file_state(model, shapes_only=True).items()}


def _is_quant_buffer(key: str, qc: dict) -> bool:
    mod, _, leaf = key.rpartition(".")
    return mod in qc["modules"] and leaf in ("qweight", "scales", "offsets", "sm", "weight_int8")
