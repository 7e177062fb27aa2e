"""GPTQ (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1; IST-DASLab/gptq gptq.py read, not copied): int4 codes
chosen column by column with the inverse Hessian's error feedback. The deviations from the paper are listed in
phiforge/quant/__init__.py."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from phiforge.quant.formats import Int4Linear, int4_codes, int4_params, rtn_module
from phiforge.utils import set_module


def gptq_int4(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool = False, block: int = 128,
              damp: float = 0.01):
    """GPTQ (Frantar et al. 2022, Alg. 1) for one weight w [N, K] with Hessian H = 2 X^T X / n [K, K].
    Returns (codes, scales, offsets) in the same format as quantize_int4."""
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.detach().double().clone()  # float64: the Cholesky of a near-singular H is fragile in fp32
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    block = max(group_size, block // group_size * group_size)  # groups never straddle a lazy-update block
    codes = torch.zeros(N, K, dtype=torch.uint8)
    ng = K // group_size
    scales, offsets = torch.zeros(N, ng), torch.zeros(N, ng)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros(N, i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # parameters from the group's current (error-updated) weights
                s, m = int4_params(W1[:, i:i + group_size], symmetric)
                scales[:, col // group_size], offsets[:, col // group_size] = s, m
            q = int4_codes(W1[:, i:i + 1], s, m)[:, 0]
            codes[:, col] = q
            err = (W1[:, i] - (q.float() * s + m)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales.half(), offsets.half()


class _Stop(Exception):
    pass


def _collect_hessians(model, modules: dict[str, nn.Linear], stop_at: nn.Module, calib: torch.Tensor, batch: int):
    """Run calibration batches until `stop_at` has run; return {name: H} for the given linears, H = 2 X^T X / n over
    the rows each linear saw: every token for a dense linear, only its routed tokens for an MoE expert (the MoE
    block calls an expert on those alone). A linear that saw no rows is left out."""
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    rows = dict.fromkeys(modules, 0)

    def hook_for(name):
        def hook(mod, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            H[name].addmm_(x.t(), x, alpha=2.0)
            rows[name] += x.shape[0]
        return hook

    def stop(mod, inputs, output):
        raise _Stop

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    handles.append(stop_at.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch):
                ids = calib[i:i + batch]
                try:
                    model(ids)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: h / rows[n] for n, h in H.items() if rows[n]}


def gptq_swap(model, specs, stage: nn.Module, names: list[str], calib, batch, symmetric):
    """GPTQ for the int4 linears among `names` (one calibration pass up to `stage`); RTN for the int8 ones."""
    linears = {n: model.get_submodule(n) for n in names if specs[n]["kind"] == "int4"}
    hessians = _collect_hessians(model, linears, stage, calib, batch)
    unrouted = [n for n in linears if n not in hessians]
    if unrouted:  # an all-zero Hessian would zero the weights (GPTQ's dead columns): round-to-nearest instead
        from tqdm import tqdm  # its write() keeps the line clear of quantize()'s progress bar

        tqdm.write(f"GPTQ: {len(unrouted)} linear(s) saw no calibration tokens (an MoE expert the router never "
                   f"picked), quantized round-to-nearest: {', '.join(unrouted)}", file=sys.stderr)
    for name in hessians:
        lin = linears[name]
        codes, s, m = gptq_int4(lin.weight, hessians[name], specs[name]["group_size"], symmetric)
        new = Int4Linear.from_codes(codes, s, m, specs[name]["group_size"], lin.bias)
        new.compute_dtype = lin.weight.dtype
        set_module(model, name, new)
    for n in names:  # int8 modules in the stage, and int4 ones without calibration tokens: round-to-nearest
        if n not in hessians:
            set_module(model, n, rtn_module(specs[n], model.get_submodule(n), symmetric))


