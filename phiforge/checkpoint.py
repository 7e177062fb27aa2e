"""Hugging Face checkpoint folders in and out: config.json + model.safetensors (or shards with
model.safetensors.index.json) + generation_config.json + tokenizer files. Safetensors only: pickle files are
refused, never opened."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from phiforge import models
from phiforge.utils import UserError, atomic_write_json, normal_mode, progress, read_json

LOAD_BAR_BYTES = 256 << 20  # models at least this big show a loading bar
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_path(path_or_repo: str) -> Path:
    """A local folder, or a Hub repo id downloaded with huggingface_hub (safetensors and json files only)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p} is a file; pass the model folder that holds config.json")
        return p
    if _looks_like_repo_id(path_or_repo):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UserError(f"{path_or_repo!r} is not a local folder, and huggingface_hub is not installed to "
                            "download it (pip install huggingface_hub)") from None
        try:
            return Path(snapshot_download(path_or_repo, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                         "*.txt", "*.jinja", "*.tiktoken"]))
        except Exception as e:  # network, auth or missing repo: one line for the user
            # `runs/x` from another folder is also a valid repo id: say both readings, the local one first
            raise UserError(f"{path_or_repo!r} is not a local folder (from {Path.cwd()}), and downloading it from "
                            f"the Hugging Face Hub failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    raise UserError(f"model folder {path_or_repo!r} does not exist" + _did_you_mean(p))


def _looks_like_repo_id(name: str) -> bool:
    """owner/name, and `owner` is not a local folder: `runs/defualt` is a mistyped path, not a Hub repo."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    return not Path(name.split("/")[0]).is_dir()


def _did_you_mean(p: Path) -> str:
    """' (did you mean runs/default?)' naming the nearest existing sibling folder, or ''."""
    import difflib

    parent = p.parent if str(p.parent) else Path(".")
    try:
        names = [c.name for c in parent.iterdir() if c.is_dir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0] if str(p.parent) != '.' else close[0]}?)" if close else ""


def read_config(folder: Path):
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{folder} has no config.json")
    hf = read_json(cfg_path)
    if not isinstance(hf, dict):
        raise UserError(f"{cfg_path} is not a JSON object")
    try:
        return models.config_from_hf(hf)
    except UserError as e:
        raise UserError(f"{cfg_path}: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.exists():
                raise UserError(f"{index} names shard {f.name}, which is missing")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickles:
        raise UserError(f"{folder} holds only pickle weights ({pickles[0]}); phiforge never unpickles files. "
                        "Convert them where you trust the file: python -c \"import torch; from safetensors.torch "
                        "import save_file; save_file(torch.load('pytorch_model.bin', weights_only=True), "
                        "'model.safetensors')\"")
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors, memory-mapped (safe_open maps the file; tensors are materialised on first use)."""
    state = {}
    files = weight_files(folder)
    total = sum(f.stat().st_size for f in files)
    # a bar for a model that takes seconds to read (Phi-3-mini: 7.6 GB), none for the small ones tests load by the
    # hundred
    bar = progress(total=total, desc="loading weights", unit="B", unit_scale=True, leave=False,
                   disable=total < LOAD_BAR_BYTES)
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    state[name] = fh.get_tensor(name)
                    bar.update(state[name].nbytes)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    bar.close()
    return state


def check_shapes(cfg, shapes: dict[str, tuple], source: str, expected: dict | None = None) -> None:
    """Every tensor the config needs (or `expected` lists: a quantized layout) is present with the right shape, and
    nothing else is: else one clear error naming the tensor and both shapes."""
    if expected is None:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in models.build(cfg).state_dict().items()}
    expected = dict(expected)
    shapes = {k: tuple(v) for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:  # tied models may still carry a copy of lm_head; the embedding is the truth
        shapes.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]} (shape {expected[missing[0]]})"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]} (shape {shapes[extra[0]]})"
                        + (f" and {len(extra) - 1} more" if len(extra) > 1 else "") + "; is this a Phi-3 checkpoint?")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise UserError(f"{source}: tensor {name} has shape {shapes[name]}, the config expects {shape}")


def read_shapes(folder: Path) -> dict[str, tuple]:
    """Tensor shapes from the safetensors headers only (no tensor data is read)."""
    shapes = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return shapes


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf weights by name: a model with one makes empty generations and `perplexity nan`, silently."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise UserError(f"{source}: tensor {name} holds {kind} values; the checkpoint is broken (a diverged "
                            "run? an fp16 overflow?): load an earlier checkpoint")


def check_and_assign(model, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> None:
    check_shapes(model.config, {k: v.shape for k, v in state.items()}, source)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    check_finite(state, source)  # after the cast: a value beyond fp16's range becomes Inf there
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.head.weight = model.embed.weight


def build_model(cfg, dtype=torch.float32, device="cpu", init: bool = True):
    """A Model of cfg's family, its memory allocated on `device` but not filled unless `init`."""
    with torch.device("meta"):
        model = models.build(cfg)
    model.to_empty(device=device)
    model.init_buffers()  # computed tables (rotary), not loaded
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    if init:
        model.init_weights()
    return model.to(dtype)


def load_hf_folder(folder: str | os.PathLike, dtype=torch.float32, device="cpu"):
    folder = resolve_path(str(folder))
    cfg = read_config(folder)
    model = build_model(cfg, dtype, device, init=False)
    check_and_assign(model, read_state_dict(folder), resolve_dtype(dtype), str(folder))
    return model.to(device).eval()


def save_hf_folder(model, folder: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 4 << 30,
                   dtype: torch.dtype | None = None) -> Path:
    """Write an HF model folder that transformers and phiforge both load. Each file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, current, size = [], {}, 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = state[name], size + nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_atomic(shards[0], folder / "model.safetensors", meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_atomic(shard, folder / fname, meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_folder_files(folder, cfg, str(next(iter(state.values())).dtype).removeprefix("torch."), tokenizer)
    return folder


def write_folder_files(folder: Path, cfg, torch_dtype: str, tokenizer=None) -> None:
    """config.json, generation_config.json (the tokenizer's stop ids) and the tokenizer files: what every model
    folder phiforge writes holds besides its weights (save_hf_folder, and quant's save_quantized and
    quantize_folder)."""
    atomic_write_json(folder / "config.json", {**cfg.to_hf(), "torch_dtype": torch_dtype})
    stop = sorted(tokenizer.stop_ids) if tokenizer is not None else [cfg.eos_token_id]
    atomic_write_json(folder / "generation_config.json",
                      {"bos_token_id": cfg.bos_token_id, "eos_token_id": stop, "pad_token_id": cfg.pad_token_id})
    if tokenizer is not None:
        tokenizer.save(folder)


def save_atomic(tensors: dict, path: Path, meta: dict) -> None:
    """save_file to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    normal_mode(tmp)
    os.replace(tmp, path)
