"""Load-time kernel choices for inference: `prepare_for_inference(model)`, and the bf16 CPU decode kernel it swaps in.

The CLIs (`generate`, `chat`), the server and eval's generation call `prepare_for_inference` once after loading; the
engine (phiforge.generate, phiforge.batch) never changes a model as a side effect.

bf16 decode on CPU: plain bf16 Linears swapped for `Bf16Linear`, which sends the few rows of a decode step to our
AVX2 kernel (phiforge/kernels/bf16_mv.cpp) and everything else to aten.

Why: a decode step is a weight stream, and aten's bf16 GEMV on CPU streams weights at about half the bandwidth of
its fp32 GEMV; the kernel reads each bf16 weight once for all rows and accumulates in fp32 (kernels/bf16_mv.cpp).
The swap is a class change to a subclass with no state of its own: the same Parameters, the same state_dict keys,
nothing else about the model changes, and any call the kernel does not cover (prefill, training, no kernel) is
nn.Linear's own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 4  # the kernel's limit; past it a GEMM (aten, oneDNN/AMX) reuses weights better


class Bf16Linear(nn.Linear):
    """nn.Linear whose bf16 CPU calls with <= MAX_ROWS rows and no autograd run phiforge.kernels.bf16_mv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        if (1 <= rows <= MAX_ROWS and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16
                and x.device.type == "cpu" and K % 8 == 0 and self.weight.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            from phiforge.kernels import bf16_mv
            op = bf16_mv()
            if op is not None:
                y = op(x.reshape(rows, K), self.weight)  # (rows, N)
                if self.bias is not None:
                    y = y + self.bias
                return y.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def use_bf16_kernel(model: nn.Module) -> int:
    """Swap every plain nn.Linear with bf16 weights on CPU for Bf16Linear, in place, when the kernel is available.
    Returns how many were swapped (0 when there is no kernel: the model is left as it was)."""
    targets = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
               and m.weight.device.type == "cpu"]
    if not targets:
        return 0
    from phiforge.kernels import bf16_mv
    if bf16_mv() is None:
        return 0
    for m in targets:
        m.__class__ = Bf16Linear
    return len(targets)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Make the load-time kernel choices for decoding, in place, and return the model: with bf16 weights on CPU,
    plain Linears become Bf16Linear (use_bf16_kernel; a no-op without the kernel). int4 modules need nothing here:
    they hold their kernel's layout from quantize/load on. Idempotent. Training is unaffected: the swapped modules
    fall back to aten under autograd."""
    use_bf16_kernel(model)
    return model
