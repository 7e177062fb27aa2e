"""Training stages (tokenize, pretrain, plot, sft, dpo) and the pieces they share:

  config.py    dataclass configs: defaults < YAML < --set key=value flags (pydantic-checked); print / save them
  common.py    what pretrain, sft and dpo share: the command-line preamble, device, model + tokenizer loading,
               value checks, the metrics log, export
  schedule.py  AdamW construction, warmup+cosine and warmup-stable-decay learning rates (pure functions)
  state.py     exact-resume checkpoints (model, optimizer, RNG, caller meta such as data cursors)
  (the next-token loss is phiforge/models/loss.py)
  shards.py    the packed token shard format
  (this file)  setting up torch.distributed and wrapping a model for DDP / FSDP2
"""
from __future__ import annotations

import os

from phiforge.utils import UserError

# torch is imported inside the helpers: `phiforge tokenize` workers import this package and need no torch.

PARALLEL = ("none", "ddp", "fsdp2")


def init_distributed(parallel: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when there is one. Returns (rank, world_size, device).

    Backend: nccl on CUDA, gloo on CPU. Without torchrun (no WORLD_SIZE) this is a single process, rank 0."""
    import torch
    import torch.distributed as dist

    if parallel not in PARALLEL:
        raise UserError(f"unknown --parallel {parallel!r}; use one of {', '.join(PARALLEL)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and parallel == "none":
        raise UserError("launched by torchrun with several processes but --parallel none; pass --parallel ddp "
                        "or --parallel fsdp2")
    cuda = torch.cuda.is_available()
    if parallel == "none":
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a single process asked for ddp/fsdp2: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap_model(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 (`fully_shard` per transformer block, then the root). Returns the module to call."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without torch.distributed)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # nccl reduces CUDA tensors only: the value travels to this rank's GPU and back
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else value.device
        reduced = value.detach().to(dev, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        value = (reduced / dist.get_world_size()).to(value.device)
    return value


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
