"""Round-to-nearest quantization of a checkpoint folder shard by shard, never holding the float model.

    quantize_folder("Phi-3.5-MoE-instruct", "moe-int4", bits=4, group_size=128)

phi-3.5-MoE is ~84 GB in bf16 across its safetensors shards and ~23 GB at int4; `quantize()` needs the whole model
in memory (168 GB as fp32), this needs about one input shard plus its quantized output. Each input shard is
memory-mapped (safe_open), each tensor read on its own, each weight quantized in slices of rows (RTN is row-wise for
both int8 and int4, so slicing changes no bit), and the shard's output is written before the next shard is opened.
The output mirrors the input's files (same shard names, a new index), in the format save_quantized writes: the
tensors are what `quantize()` + `save_quantized()` give for the same model loaded as float32, bit for bit, because
the slices go through the very modules (formats.rtn_module) and their file layout (checkpoint.file_state).

Which modules get which format is `quantize()`'s choice (`plan`), made on the model built on the meta device.
GPTQ needs calibration forwards through the model, so it stays with `quantize()`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from phiforge.quant.checkpoint import SAFETENSORS_META, file_state
from phiforge.quant.formats import rtn_module
from phiforge.utils import UserError, atomic_write_json, progress

SLICE_BYTES = 16 << 20  # fp32 bytes of weight quantized at once: bounds quantize_int4's few full-size temporaries


def meta_model(folder: Path):
    """The float checkpoint folder's config and its Model on the meta device (shapes and module names, no memory),
    once every tensor in the folder's headers is known to be there with its shape (else one error naming the tensor,
    before `phiforge quantize` prints or writes anything)."""
    from phiforge import models
    from phiforge.checkpoint import check_shapes, read_config, read_shapes

    if (folder / "quant_config.json").exists():
        raise UserError(f"{folder} is already quantized (it has quant_config.json); quantize the float checkpoint")
    cfg = read_config(folder)
    check_shapes(cfg, read_shapes(folder), str(folder))
    with torch.device("meta"):
        return cfg, models.build(cfg)


def _quantize_slices(spec: dict, w, key: str, symmetric: bool, source: str) -> dict[str, torch.Tensor]:
    """The file tensors (leaf -> tensor) of the weight `w` [N, K] (a safetensors slice: rows are read from the
    mapped file as they are needed) quantized per `spec`, slice of rows by slice."""
    from phiforge.checkpoint import check_finite

    N, K = w.get_shape()
    rows = max(4, SLICE_BYTES // (4 * K) // 4 * 4)
    parts: dict[str, list] = {}
    for i in range(0, N, rows):
        chunk = w[i:i + rows].float()
        check_finite({key: chunk}, source)
        if spec["kind"] == "int8_embedding":
            old = nn.Embedding(*chunk.shape, device="meta")
        else:
            old = nn.Linear(chunk.shape[1], chunk.shape[0], bias=False, device="meta")
        old.weight = nn.Parameter(chunk, requires_grad=False)
        for leaf, t in file_state(rtn_module(spec, old, symmetric)).items():
            parts.setdefault(leaf, []).append(t)
    return {leaf: torch.cat(ts) for leaf, ts in parts.items()}


@torch.no_grad()
def quantize_folder(src, out, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                    embed_bits: int | None = None, tokenizer=None) -> Path:
    """RTN-quantize the checkpoint folder `src` into `out`, one shard at a time (module doc). Returns `out`."""
    from phiforge.checkpoint import LOAD_BAR_BYTES, check_finite, save_atomic, weight_files, write_folder_files
    from phiforge.quant import plan

    src, out = Path(src), Path(out)
    cfg, model = meta_model(src)  # checks every tensor's name and shape before any work
    qc = plan(model, bits, group_size, symmetric, "rtn", embed_bits)
    specs = qc["modules"]
    # A tied head is the embedding (load_hf_folder ties it, ignoring a stored lm_head copy): quantize it from there.
    sources = {f"{name}.weight": name for name in specs}
    tied_head = cfg.tie_word_embeddings and "lm_head" in specs
    if tied_head:
        sources.pop("lm_head.weight")
    files = weight_files(src)
    out.mkdir(parents=True, exist_ok=True)
    total_in = sum(f.stat().st_size for f in files)
    bar = progress(total=total_in, desc="quantizing", unit="B", unit_scale=True, leave=False,
                   disable=total_in < LOAD_BAR_BYTES)
    weight_map, total = {}, 0
    for f in files:
        state = {}
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                        continue
                    heads = [sources.get(key)] + (["lm_head"] if tied_head and key == "model.embed_tokens.weight"
                                                  else [])
                    if heads[0] is None:  # a float tensor (norms, biases, router, float embedding): as float32
                        t = fh.get_tensor(key)
                        check_finite({key: t}, str(src))
                        state[key] = t.float() if t.is_floating_point() else t
                    for name in filter(None, heads):
                        state.update({f"{name}.{leaf}": v for leaf, v in
                                      _quantize_slices(specs[name], fh.get_slice(key), key, symmetric,
                                                       str(src)).items()})
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
        save_atomic(state, out / f.name, SAFETENSORS_META)
        bar.update(f.stat().st_size)
        weight_map.update(dict.fromkeys(state, f.name))
        total += sum(t.nbytes for t in state.values())
        del state
    bar.close()
    if len(files) == 1:  # a stale index from an earlier sharded run would take precedence over model.safetensors
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                                 "weight_map": dict(sorted(weight_map.items()))})
    write_folder_files(out, cfg, "float32", tokenizer)
    atomic_write_json(out / "quant_config.json", qc)
    return out


def folder_bytes(folder) -> int:
    """Bytes of the safetensors files in `folder`."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
