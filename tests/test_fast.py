"""bf16 decode kernel (phiforge/kernels/bf16_mv.cpp via phiforge/fast.py): each output is the fp32 dot product of the
bf16 inputs rounded once to bf16, for every row count it takes and ragged N; the swapped model keeps its weights,
falls back to aten outside the kernel's cases, and decodes like the plain model, eager and under torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from phiforge.fast import Bf16Linear, use_bf16_kernel
from phiforge.kernels import bf16_mv

pytestmark = pytest.mark.skipif(bf16_mv() is None, reason="bf16_mv kernel unavailable (no AVX2 CPU or C++ toolchain)")


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("N,K", [(37, 64), (256, 200), (1030, 3072)])
def test_kernel_is_the_fp32_dot_product_rounded_once(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    exact = x.double() @ w.double().T  # (M, N)
    out = bf16_mv()(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    # one bf16 rounding (relative 2^-8) plus fp32 summation error
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4 * K ** 0.5).all()
    # and the same numbers aten's bf16 linear gives, up to one bf16 ulp where summation order differs
    aten = torch.nn.functional.linear(x, w)
    assert ((out.float() - aten.float()).abs() <= aten.float().abs() * 2 ** -7 + 1e-3).all()


def test_kernel_rejects_what_it_cannot_do():
    op = bf16_mv()
    with pytest.raises(RuntimeError, match="K % 8"):
        op(torch.zeros(1, 12, dtype=torch.bfloat16), torch.zeros(4, 12, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="M <= 4"):
        op(torch.zeros(5, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16"):
        op(torch.zeros(1, 16), torch.zeros(4, 16, dtype=torch.bfloat16))


def test_swap_keeps_weights_and_falls_back_outside_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 40)).bfloat16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert use_bf16_kernel(model) == 2
    assert all(type(m) is Bf16Linear for m in model)
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # the same tensors, no copy
    assert model.state_dict().keys() == before.keys()
    for x in (torch.randn(1, 64), torch.randn(2, 3, 64), torch.randn(9, 64)):  # kernel, kernel (6 > 4: aten), aten
        x = x.bfloat16()
        ref = nn.functional.linear(nn.functional.linear(x, before["0.weight"]), before["1.weight"], before["1.bias"])
        torch.testing.assert_close(model(x), ref, atol=2e-2, rtol=2e-2)
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)  # autograd: aten, so gradients flow
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    assert use_bf16_kernel(nn.Linear(8, 8)) == 0  # fp32 weights: untouched


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_decode_with_the_kernel_matches_the_plain_model(compile):
    from phiforge.generate import generate
    from phiforge.sample import GenerationConfig
    from phiforge.models import config_from_name
    from phiforge.models.phi3 import Phi3, Phi3Config
    torch.manual_seed(0)
    plain = Phi3(config_from_name("tiny-gqa"))
    plain.init_weights(seed=0)
    plain = plain.bfloat16().eval()
    fast = Phi3(plain.config).bfloat16().eval()
    fast.load_state_dict(plain.state_dict())
    prompt = [[5, 9, 2, 33, 7, 1, 60, 11]]
    ids = torch.tensor(prompt)
    with torch.no_grad():
        full_plain = plain(ids)  # (1, T, V), aten
        assert use_bf16_kernel(fast) > 0
        full_fast = fast(ids[:, -1:], positions=torch.tensor([ids.shape[1] - 1]))  # note: no cache, one row
    assert full_fast.shape[1] == 1
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=())
    a = generate(plain, None, prompt, cfg)[0].token_ids
    b = generate(fast, None, prompt, cfg, compile=compile)[0].token_ids
    assert type(fast.lm_head) is Bf16Linear
    # bf16 summation order may flip a near-tie; on this seed the greedy tokens agree at every step
    assert a == b
