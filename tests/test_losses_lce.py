"""The fused LM head + cross-entropy (models/loss.linear_cross_entropy) equals F.cross_entropy(h @ W^T) in value and
gradients, with ignored targets, several chunks, bf16 autocast and without grad; Phi3(targets=...) uses it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phiforge.models.loss import linear_cross_entropy


def _inputs(dtype=torch.float32, N=37, C=24, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g, dtype=dtype) * 0.3).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100  # ignored rows get no loss and no gradient
    return h, w, y


@pytest.mark.parametrize("chunk_elems", [1 << 21, 500])  # one chunk / many chunks (rows = 4)
def test_fp32_value_and_grads_equal_reference(chunk_elems):
    h, w, y = _inputs()
    ref = F.cross_entropy(h @ w.t(), y)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    ours = linear_cross_entropy(h, w, y, chunk_elems=chunk_elems)
    gh, gw = torch.autograd.grad(ours, (h, w))
    assert abs(ours.item() - ref.item()) < 1e-6
    torch.testing.assert_close(gh, gh_ref, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-7, rtol=1e-5)
    assert gh[::5].abs().max() == 0  # ignored rows


def test_upstream_gradient_scales_and_3d_shapes():
    h, w, y = _inputs(N=24)
    h3, y3 = h.reshape(2, 12, -1), y.reshape(2, 12)
    (3.0 * linear_cross_entropy(h3, w, y3)).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (3.0 * F.cross_entropy((h3 @ w.t()).reshape(-1, w.shape[0]), y3.reshape(-1))).backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-7, rtol=1e-5)


def test_bf16_autocast_matches_autocast_reference():
    h, w, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y)
        ours = linear_cross_entropy(h, w, y, chunk_elems=500)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(ours, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    assert abs(ours.item() - ref.item()) < 1e-5
    torch.testing.assert_close(gh, gh_ref, atol=2e-4, rtol=2e-2)
    torch.testing.assert_close(gw, gw_ref, atol=2e-4, rtol=2e-2)


def test_no_grad_and_all_ignored():
    h, w, y = _inputs()
    with torch.no_grad():
        assert abs(linear_cross_entropy(h, w, y).item() - F.cross_entropy(h @ w.t(), y).item()) < 1e-6
    assert torch.isnan(linear_cross_entropy(h, w, torch.full_like(y, -100)))  # as F.cross_entropy


def test_model_targets_path_equals_logits_path():
    from phiforge.models import config_from_name
    from phiforge.models.phi3 import Phi3, Phi3Config
    torch.manual_seed(0)
    model = Phi3(config_from_name("tiny-gqa"))
    model.init_weights(seed=0)
    V = model.lm_head.weight.shape[0]
    x = torch.randint(0, V, (2, 16))
    y = torch.randint(0, V, (2, 16))
    y[0, :3] = -100
    ref = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = model(x, targets=y)
    ours.backward()
    assert abs(ours.item() - ref.item()) < 1e-6
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)
