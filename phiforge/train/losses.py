"""Training losses as small pure functions. One variant per function (SFT and DPO losses are added here too)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, mean over the target tokens that are not `ignore_index`.

    logits (B, T, V) in any dtype (upcast to fp32 here so bf16 autocast does not round the loss);
    targets (B, T) long, already shifted (targets[:, t] is the token after input position t)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)
