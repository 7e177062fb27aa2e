"""SparseMixer-v2's training router (models/phimoe.py: sparsemixer_train, HeunMultiplier, the input jitter) against
transformers 5's `sparsemixer(scores, jitter_eps, training)` and `PhimoeSparseMoeBlock` (the reference, read in
transformers/models/phimoe/modeling_phimoe.py as installed).

transformers draws its random numbers from torch's global RNG; phiforge draws the same numbers with the same calls
in the same order, from a torch.Generator when given one, else from the global RNG. So each comparison seeds the
global RNG identically before the reference and before phiforge (or hands phiforge a generator with that seed)."""
import pytest
import torch

from phiforge.models import config_from_name
from phiforge.models.phimoe import SparseMoE, sparsemixer_top2, sparsemixer_train

EPS = 0.01


def scores_with_edge_cases(n: int = 600, e: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, e, generator=g) * torch.rand(n, 1, generator=g) * 3  # both signs, narrow and wide spreads
    s[0] = torch.tensor([1.0, 0.99, 0.5, -1, -2, 0.2, 0.1, 0.0])  # second logit inside the 2*eps band
    s[1] = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0, -1, -2, -3])  # an exact three-way tie at the top
    s[2] = torch.full((e,), 0.7)  # every logit tied
    s[3] = torch.tensor([-0.5, -0.505, -0.51, -3, -4, -5, -6, -7])  # negative maximum, three inside the band
    s[4] = torch.tensor([0.0, 0.0, -1e-3, -1, -1, -1, -1, -1])  # zero maximum (band factor clamps at 0)
    s[5] = torch.tensor([5.0, 4.91, 4.9, 4.89, 0, 0, 0, 0])  # the second pick's band differs from the first's
    return s


def reference(scores, training, seed):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer
    x = scores.clone().requires_grad_()
    torch.manual_seed(seed)
    w, i = sparsemixer(x, jitter_eps=EPS, training=training)
    return x, w, i


def grad_of(x, w, cot):
    (w * cot).sum().backward()
    return x.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_router_equals_transformers_sparsemixer(seed):
    scores = scores_with_edge_cases(seed=seed)
    cot = torch.randn(scores.shape[0], 2, generator=torch.Generator().manual_seed(100 + seed))
    x_ref, w_ref, i_ref = reference(scores, True, seed)
    g_ref = grad_of(x_ref, w_ref, cot)

    x = scores.clone().requires_grad_()
    torch.manual_seed(seed)  # the global RNG, as transformers
    w, i = sparsemixer_train(x, EPS)
    g = grad_of(x, w, cot)
    assert torch.equal(i, i_ref) and torch.equal(w, w_ref)
    err = (g - g_ref).abs().max().item()
    print(f"seed {seed}: weights bit-exact, grad max abs diff {err:.1e}, "
          f"{(i[:, 0] != scores.argmax(-1)).sum().item()} of {len(i)} first picks not the argmax")
    assert err <= 1e-6

    y = scores.clone().requires_grad_()  # the same draws handed in as a generator
    w_gen, i_gen = sparsemixer_train(y, EPS, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(i_gen, i_ref) and torch.equal(w_gen, w_ref)
    assert torch.equal(grad_of(y, w_gen, cot), g)
    # sampling really samples, the router gets a gradient where the band softmax alone would give none
    assert (i[:, 0] != scores.argmax(-1)).any() and (w < 0.5).any()
    assert g.abs().sum() > 0


def test_inference_router_equals_transformers_including_gradients():
    scores = scores_with_edge_cases()
    cot = torch.randn(scores.shape[0], 2, generator=torch.Generator().manual_seed(5))
    x_ref, w_ref, i_ref = reference(scores, False, 0)
    g_ref = grad_of(x_ref, w_ref, cot)
    x = scores.clone().requires_grad_()
    w, i = sparsemixer_top2(x, EPS)
    assert torch.equal(i, i_ref) and torch.equal(w, w_ref)
    err = (grad_of(x, w, cot) - g_ref).abs().max().item()
    print(f"inference router grad max abs diff {err:.1e}")
    assert err <= 1e-6


def test_moe_block_in_training_equals_transformers_block():
    """The whole SparseMoE in train mode (jitter, sampled routing, experts, Heun gradient) against
    PhimoeSparseMoeBlock on the same weights and draws. transformers 5 applies the input jitter twice (block and
    router, in place); the released code and phiforge once, in the block: the reference's router jitter is off."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    cfg = config_from_name("tiny-moe", num_local_experts=6, input_jitter_noise=0.05)
    d = cfg.to_hf()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    torch.manual_seed(0)
    ref = PhimoeSparseMoeBlock(PhimoeConfig(**d)).train()
    ref.router.input_jitter_noise = 0.0
    F_ = cfg.intermediate_size
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ours = SparseMoE(cfg).train()
    with torch.no_grad():  # transformers 5's fused experts -> one module per expert
        ours.gate.weight.copy_(ref.router.weight)
        for e, ex in enumerate(ours.experts):
            ex.w1.weight.copy_(ref.experts.gate_up_proj[e, :F_])
            ex.w3.weight.copy_(ref.experts.gate_up_proj[e, F_:])
            ex.w2.weight.copy_(ref.experts.down_proj[e])

    x0 = torch.randn(3, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cot = torch.randn(3, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    xr, xo = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    torch.manual_seed(7)
    yr = ref(xr * 1.0)  # * 1.0: the reference jitters in place, which a leaf does not allow
    (yr * cot).sum().backward()
    torch.manual_seed(7)
    yo = ours(xo)
    (yo * cot).sum().backward()
    out_err = (yo - yr).abs().max().item()
    grads = {"input": (xo.grad, xr.grad), "gate": (ours.gate.weight.grad, ref.router.weight.grad),
             "w1": (torch.stack([e.w1.weight.grad for e in ours.experts]), ref.experts.gate_up_proj.grad[:, :F_]),
             "w3": (torch.stack([e.w3.weight.grad for e in ours.experts]), ref.experts.gate_up_proj.grad[:, F_:]),
             "w2": (torch.stack([e.w2.weight.grad for e in ours.experts]), ref.experts.down_proj.grad)}
    # relative to the largest gradient entry: the weight gradients are sums over tokens, added in another order
    errs = {k: ((a - b).abs().max() / b.abs().max()).item() for k, (a, b) in grads.items()}
    print(f"block: output max abs diff {out_err:.1e}; grads max abs diff / max abs grad: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert out_err <= 1e-6 and max(errs.values()) <= 1e-6
    assert ours.gate.weight.grad.abs().sum() > 0
    assert ours.routed.sum().item() == 3 * 20 * 2  # every token counted twice (two experts each)
