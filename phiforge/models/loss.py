"""The next-token loss every model's forward computes with `targets`: plain, and fused with the LM head.

Preference losses (DPO, ...) live in train/pref_losses.py; they start from sequence log-probs (phiforge/scoring.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def lm_head_loss(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """cross_entropy(head(h), targets). A plain bias-free Linear head is fused with the loss (linear_cross_entropy);
    a biased head (PhiMoE's lm_head_bias), or one that LoRA or quantization swapped in, runs its own forward. Under
    torch.compile the plain form is used too: inductor fuses it itself."""
    if type(head) is nn.Linear and head.bias is None and not torch.compiler.is_compiling():
        return linear_cross_entropy(h, head.weight, targets, ignore_index)
    return cross_entropy(head(h), targets, ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, mean over the target tokens that are not `ignore_index`.

    logits (B, T, V) in any dtype (upcast to fp32 here so bf16 autocast does not round the loss);
    targets (B, T) long, already shifted (targets[:, t] is the token after input position t)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_elems: int = 1 << 21) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) without ever holding the (N, V) logits: the LM head and the loss fused.

        L = 1/|M| sum_{i in M} (logsumexp_v z_iv - z_{i,y_i}),   z = h W^T,   M = {i : y_i != ignore_index}
        dL/dz_i = (softmax(z_i) - onehot(y_i)) / |M|   for i in M, else 0

    h (..., C) final hidden states; weight (V, C) the LM head; targets (...) long, already shifted. Rows are taken
    a chunk at a time (chunk rows x V ~ `chunk_elems` fp32 logits, a few MB that stay in cache); each chunk's
    gradients are formed right away, so the backward pass only scales them. This removes the (N, V) fp32 logits,
    their log-softmax and its backward, which on CPU cost more than the LM head's matmul (the zero-filled and copied
    buffers are fresh pages every step). Matmuls run in the autocast dtype when autocast is on, as the LM head's
    Linear would; logits, log-sum-exp and the loss are fp32 either way."""
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index,
                                     chunk_elems, grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_elems, grad):
        # h (N, C), weight (V, C), targets (N,)
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            hc, w = h.to(cdt), weight.to(cdt)
            N, V = hc.shape[0], w.shape[0]
            valid = targets != ignore_index  # (N,)
            n_valid = valid.sum()
            scale = 1.0 / n_valid.clamp(min=1).float()
            tgt = torch.where(valid, targets, 0)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hc) if grad and ctx.needs_input_grad[0] else None  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) \
                if grad and ctx.needs_input_grad[1] else None  # (V, C)
            rows = max(1, chunk_elems // V)
            for i in range(0, N, rows):
                j = min(N, i + rows)
                z = (hc[i:j] @ w.t()).float()  # (n, V) fp32 logits of this chunk
                logp = torch.log_softmax(z, dim=-1)  # (n, V): one fused pass
                m = valid[i:j]
                total -= torch.where(m, logp.gather(1, tgt[i:j, None]).squeeze(1), 0.0).sum()
                if grad_h is None and grad_w is None:
                    continue
                g = logp.exp_()  # softmax, in place
                g.scatter_add_(1, tgt[i:j, None], torch.full((j - i, 1), -1.0, device=h.device))
                g.mul_((m.float() * scale)[:, None])  # ignored rows get no gradient
                g = g.to(cdt)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[i:j])  # (n, C)
                if grad_w is not None and cdt == torch.float32:
                    grad_w.addmm_(g.t(), hc[i:j])  # (V, C)
                elif grad_w is not None:
                    grad_w += (g.t() @ hc[i:j]).float()  # (V, C), summed over chunks in fp32
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n_valid  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None
