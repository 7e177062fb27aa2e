"""Optimizer and learning-rate schedules, shared by pretrain, SFT and DPO.

Schedules are pure functions of the step, so the "scheduler state" of a checkpoint is just the step counter:
resuming at step s gives exactly the learning rate an uninterrupted run had.

    opt = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    for step in range(total):
        set_lr(opt, lr_at(step, "cosine", max_lr=3e-4, min_lr=3e-5, warmup_steps=100, total_steps=total))
"""
from __future__ import annotations

import math

import torch

from phiforge.utils import UserError

SCHEDULES = ("cosine", "wsd", "constant")


def warmup_cosine(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from max_lr/warmup_steps to max_lr over `warmup_steps`, then cosine decay to min_lr at
    `total_steps` (and min_lr after it)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                        decay_steps: int) -> float:
    """Warmup-stable-decay (MiniCPM, Hu et al. 2024, arXiv:2404.06395): linear warmup, a constant max_lr
    plateau, then a linear decay to min_lr over the last `decay_steps` steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return max_lr
    if step >= total_steps:
        return min_lr
    progress = (step - decay_start) / max(1, decay_steps)
    return max_lr + (min_lr - max_lr) * progress


def lr_at(step: int, schedule: str, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          decay_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based) under a named schedule (see SCHEDULES)."""
    if schedule == "cosine":
        return warmup_cosine(step, max_lr, min_lr, warmup_steps, total_steps)
    if schedule == "wsd":
        return warmup_stable_decay(step, max_lr, min_lr, warmup_steps, total_steps, decay_steps)
    if schedule == "constant":
        return max_lr * (step + 1) / warmup_steps if step < warmup_steps else max_lr
    raise UserError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def check_schedule(schedule: str, warmup_steps: int, total_steps: int, decay_steps: int = 0) -> None:
    """Raise UserError for a schedule that cannot work (call before training starts)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise UserError(f"max_steps must be >= 1 (got {total_steps})")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"warmup_steps {warmup_steps} must be between 0 and max_steps {total_steps}")
    if schedule == "wsd" and not 0 < decay_steps <= total_steps - warmup_steps:
        raise UserError(f"wsd needs 0 < decay_steps <= max_steps - warmup_steps (got decay_steps={decay_steps}, "
                        f"max_steps={total_steps}, warmup_steps={warmup_steps})")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2: linear weights, embeddings) and none on norm gains.
    Only parameters with requires_grad are optimised (so LoRA / frozen layers work unchanged)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one pass over each tensor (4x faster than the per-tensor loop on CPU); FSDP2's DTensor
    # shards take the default implementation.
    fused = all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group (call before optimizer.step())."""
    for group in optimizer.param_groups:
        group["lr"] = lr
