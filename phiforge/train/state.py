"""Training-state checkpoints: save everything a run needs to continue exactly, load it back.

A checkpoint is a step directory `RUN/ckpt/step_00000100/` holding
  model.safetensors       full (unsharded) model state, HF parameter names
  optimizer.safetensors   optimizer tensors, keyed `state/<param name>/<key>` (e.g. exp_avg)
  rng_rank<r>.safetensors each rank's torch (+ CUDA) RNG state; Python's `random` state in its metadata
  state.json              step, optimizer param groups and scalar state, the caller's `meta` (data cursors,
                          scheduler info, anything JSON), format version
  config.yaml             the resolved run config (when given)
Safetensors + JSON only: nothing is ever pickled or unpickled. The directory is written as `.step_*.tmp` and
renamed into place, so a kill mid-save leaves the previous checkpoints intact; only the last `keep_last` are kept.

Works unchanged for a plain module, DDP and FSDP2 (uses torch.distributed.checkpoint.state_dict to gather
full state on save and to re-shard on load). Under torch.distributed every rank must call save/load.

    save_checkpoint(run_dir, step, model, optimizer, meta={"cursors": ...}, config=cfg, keep_last=3)
    ckpt = latest_checkpoint(run_dir)
    meta = load_checkpoint(ckpt, model, optimizer)   # restores RNG too; returns meta (+ "step")
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from phiforge.utils import UserError, atomic_write_json, atomic_write_text, normal_mode, read_json

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own contiguous copy."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(_unshare(tensors), str(path), metadata=metadata)
    normal_mode(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} is unreadable ({str(e).splitlines()[0]})") from None


# -- RNG -----------------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: (tensors, JSON-able) = torch CPU (+ CUDA per device), Python `random`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "python_random" in extra:
        version, internal, gauss = extra["python_random"]
        random.setstate((version, tuple(internal), gauss))


# -- optimizer state <-> flat tensors + JSON ---------------------------------------------------------------------
def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state dict (param names as keys, from get_optimizer_state_dict) -> (tensors, json)."""
    tensors, scalars = {}, {}
    for pname, pstate in osd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pname}/{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(pname, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"scalar_state": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict:
    state: dict[str, dict] = {}
    for name, value in tensors.items():
        _, rest = name.split("/", 1)
        pname, key = rest.rsplit("/", 1)
        state.setdefault(pname, {})[key] = value
    for pname, extra in js.get("scalar_state", {}).items():
        state.setdefault(pname, {}).update(extra)
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- checkpoints ---------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under RUN/ckpt, oldest first (temporary .tmp directories are ignored)."""
    ckpt = Path(run_dir) / "ckpt"
    if not ckpt.is_dir():
        return []
    found = [p for p in ckpt.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint a run starts from: None for a fresh run, the newest (`resume == "latest"`) or the given one.
    A fresh run into a folder that already holds checkpoints is refused rather than silently overwriting them."""
    run_dir = Path(run_dir)
    if resume:
        path = latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'ckpt'}")
        return path
    if latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    return None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any] | None = None, config: Any = None, keep_last: int = 3) -> Path:
    """Write RUN/ckpt/step_<step> atomically and delete all but the newest `keep_last` checkpoints.

    `model` is the module being trained (plain, DDP- or FSDP2-wrapped; pass the un-compiled module). `meta` is any
    JSON-able dict (data cursors, scheduler settings, counters). `config` is a dataclass (saved as config.yaml) or
    None. Every rank must call this under torch.distributed; rank 0 writes the shared files."""
    from phiforge.train.config import format_config

    run_dir = Path(run_dir)
    rank = _rank()
    final = run_dir / "ckpt" / f"step_{step:08d}"
    tmp = run_dir / "ckpt" / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)  # collective under FSDP2
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    rng_tensors, rng_extra = rng_state()
    _save_tensors(rng_tensors, tmp / f"rng_rank{rank}.safetensors", {"extra": json.dumps(rng_extra)})
    _barrier()
    if rank == 0:
        _save_tensors(model_sd, tmp / "model.safetensors", {"format": "pt"})
        state = {"format_version": FORMAT_VERSION, "step": step, "meta": meta or {},
                 "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        if optim_sd is not None:
            o_tensors, o_json = flatten_optimizer_state(optim_sd)
            _save_tensors(o_tensors, tmp / "optimizer.safetensors")
            state["optimizer"] = o_json
        if config is not None:
            atomic_write_text(tmp / "config.yaml", format_config(config))
        atomic_write_json(tmp / "state.json", state)  # written last: its presence marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename durable
        finally:
            os.close(fd)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """state.json of a checkpoint (step, meta, optimizer groups) without touching tensors."""
    p = Path(path) / "state.json"
    if not p.exists():
        raise UserError(f"{path} is not a complete checkpoint (no state.json)")
    state = read_json(p)
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p} has checkpoint format {state.get('format_version')}, this phiforge reads "
                        f"{FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`), restore this rank's RNG; return meta with "step" added.

    The model/optimizer must be built (and wrapped) the same way as when saved; the world size may differ
    (state is stored unsharded). RNG is taken from this rank's file, else rank 0's."""
    path = Path(path)
    state = read_checkpoint_state(path)
    opts = StateDictOptions(full_state_dict=True)
    model_sd = _load_tensors(path / "model.safetensors")
    try:
        set_model_state_dict(model, model_sd, options=opts)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}/model.safetensors does not fit this model ({str(e).splitlines()[0]}); "
                        "was it saved with other model dimensions?") from None
    if optimizer is not None:
        if "optimizer" not in state:
            raise UserError(f"{path} holds no optimizer state")
        osd = unflatten_optimizer_state(_load_tensors(path / "optimizer.safetensors"), state["optimizer"])
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
    if restore_rng:
        rng_file = path / f"rng_rank{_rank()}.safetensors"
        if not rng_file.exists():
            rng_file = path / "rng_rank0.safetensors"
        from safetensors import safe_open
        with safe_open(str(rng_file), framework="pt") as fh:
            extra = json.loads((fh.metadata() or {}).get("extra", "{}"))
        set_rng_state(_load_tensors(rng_file), extra)
    meta = dict(state.get("meta", {}))
    meta["step"] = state["step"]
    return meta
