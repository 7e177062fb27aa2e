"""Weight-only quantization: primitives against their definitions, every CPU matmul path against the fp32
dequantized oracle (STYLE 8), GPTQ against round-to-nearest, and save -> load -> same tokens."""
from __future__ import annotations

import pytest
import torch

from phiforge import quant

from phiforge.quant import cli as quant_cli
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.utils import UserError


def _linear(n, k, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data.normal_(0, 0.05)
    return lin


def test_pack_roundtrip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.shape == (5, 48)
    assert torch.equal(quant.unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 16]) << 4  # ggml q4_0 order within a block


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_int4_error_is_at_most_half_a_step(group_size, symmetric):
    w = torch.randn(16, 256) * 0.1
    codes, s, m = quant.quantize_int4(w, group_size, symmetric)
    assert codes.max() <= 15 and s.dtype == torch.float16
    err = (quant.dequantize_int4(codes, s, m) - w).abs().reshape(16, -1, group_size)
    step = s.float()[..., None]
    if symmetric:  # the range is +-7 steps around 0, so nothing clips: nearest code is within half a step
        assert (err <= step / 2 + 1e-6).all()
    else:  # fp16 rounding of the offset can cost up to one extra fp16 ulp of the offset
        assert (err <= step / 2 + m.float().abs()[..., None] * 2**-10 + 1e-6).all()


def test_int8_primitives_and_modules():
    lin = _linear(48, 64)
    q8 = quant.Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert ((q8.dequantize() - w).abs() <= q8.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(q8(x), x @ q8.dequantize().T, rtol=1e-4, atol=1e-5)
    emb = torch.nn.Embedding(50, 16)
    qe = quant.Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 49]])
    torch.testing.assert_close(qe(ids), emb(ids), atol=float(qe.scales.max()) / 2 + 1e-7, rtol=0)


def _backend_group_sizes():
    """(backend, G) pairs. Blocks of 32 per group: 1, 2, 4, 8 (our kernel's compiled-in sizes) and 3 (its generic
    path, which ends each group with a one-block s16 stage); aten's kernel does not take G = 96."""
    from phiforge.kernels import int4_mm

    no_kernel = () if int4_mm() is not None else pytest.mark.skip(
        reason="C++ int4 kernel unavailable here (no AVX2/F16C CPU, compiler or ninja)")
    return [pytest.param(b, G, marks=no_kernel if b == "ours" else ())
            for b in ("dequant", "torch", "ours") for G in (32, 64, 128, 256, 96) if not (b == "torch" and G == 96)]


@pytest.mark.parametrize("backend,G", _backend_group_sizes())
@pytest.mark.parametrize("M", [1, 3, 37])  # decode GEMV, the 4-row activation remainder, a prefill GEMM
def test_int4_linear_matches_dequantized_reference(backend, M, G):
    N = 80 if backend == "torch" else 75  # aten needs N % 16 == 0; 75 exercises the kernel's padded last tile
    K = 768
    lin = _linear(N, K)
    q = quant.Int4Linear.from_linear(lin, group_size=G)
    q.backend = backend
    x = torch.randn(M, K) * torch.linspace(0.1, 4, K)  # uneven magnitudes: per-group activation scales matter
    W = q.dequantize()
    ref = x.double() @ W.double().T
    y = q(x)
    assert y.shape == (M, N) and y.dtype == x.dtype
    if backend == "ours":
        # Stated bound: the kernel rounds activations to int8 per group (step d = absmax / 127) in the s * q term
        # only (offsets multiply exact fp32 group sums), so |y - ref| <= sum_k s q[n, k] * d_group(k) / 2, plus fp32
        # accumulation slack. Not |W| in place of s q: with an offset, |s q| = |W - m| can exceed |W|.
        d = x.reshape(M, -1, G).abs().amax(-1) / 127
        sq = (W - q.offsets.float().repeat_interleave(G, dim=1)).abs()
        bound = (sq.double().reshape(N, -1, G).sum(-1) @ (d.double().T / 2)).T
        assert ((y.double() - ref).abs() <= bound * 1.001 + 1e-4).all()
        assert (y.double() - ref).abs().max() > 0  # it is the int8-activation kernel, not a float path
        # Tight check: emulate the kernel's arithmetic (int8 codes round-half-even of x * fp32(1/d), exact integer
        # dot products, scales applied per group, offsets times the fp32 group sums); only fp32 rounding remains.
        xg = x.reshape(M, -1, G)
        d32 = xg.abs().amax(-1) / 127
        xq = torch.round(xg * (1 / d32)[..., None]).double()  # [M, ng, G]
        codes = quant.unpack_int4(q.rows_qweight()).double().reshape(N, -1, G)  # [N, ng, G]
        dots = torch.einsum("mgk,ngk->mng", xq, codes)  # exact integers
        s, m = q.scales.double(), q.offsets.double()  # [N, ng]
        emu = (dots * d32.double()[:, None, :] * s).sum(-1) + xg.double().sum(-1) @ m.T
        scale = (dots.abs() * d32.double()[:, None, :] * s.abs()).sum(-1) + xg.double().abs().sum(-1) @ m.abs().T
        assert ((y.double() - emu).abs() <= 1e-5 * scale + 1e-6).all(), (y.double() - emu).abs().max()
    elif backend == "torch":  # bf16 activations: each x rounded by <= 2^-9 relative
        bound = (W.abs().double() @ (x.abs().double().T * 2**-8)).T
        assert ((y.double() - ref).abs() <= bound + 1e-3).all()
    else:
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_int4_auto_backend_without_our_kernel(monkeypatch):
    """Without our kernel, auto takes aten's kernel only where aten applies (N % 16 == 0 and its group sizes), else
    it dequantizes: G = 96 must not reach aten (it would fail)."""
    from phiforge import kernels

    monkeypatch.setitem(kernels._state, "int4_mm", None)
    x = torch.randn(2, 768)
    for N, G, want in ((80, 128, "torch"), (80, 96, "dequant"), (75, 128, "dequant")):
        q = quant.Int4Linear.from_linear(_linear(N, 768), group_size=G)
        assert q._pick(x) == want, (N, G)
        tol = 2e-2 if want == "torch" else 1e-4  # aten's kernel takes bf16 activations
        torch.testing.assert_close(q(x).double(), x.double() @ q.dequantize().double().T, rtol=tol, atol=tol)


def test_tiled_layout_round_trips_and_never_leaks_into_checkpoints():
    """An Int4Linear holds our kernel's tiled layout from the moment it is made (a forward converts nothing); the
    file format (quant.file_state, what save_quantized writes) is still the row layout, dequantize sees the same
    weights, and a fresh module loaded from the file tensors computes the same outputs. A padded last tile when
    N % 4 != 0."""
    from phiforge.kernels import int4_mm

    for n in (48, 75):
        lin = _linear(n, 128)
        q = quant.Int4Linear.from_linear(lin, group_size=32)
        c, s_, m_ = quant.quantize_int4(lin.weight.detach(), 32)
        codes, s, m = quant.pack_int4(c), s_, m_
        wt, sm = quant.tile_int4(codes, s, m)
        assert wt.shape == (n + -n % 4, 64) and sm.shape == ((n + 3) // 4, 4, 8)
        assert torch.equal(quant.untile_int4(wt)[:n], codes)
        assert torch.equal(sm[0, 1, :4], s[:4, 1]) and torch.equal(sm[0, 1, 4:], m[:4, 1])  # group 1 of tile 0
        assert torch.equal(q.qweight, wt) and torch.equal(q.sm, sm)  # tiled when made ...
        assert torch.equal(q.rows_qweight(), codes) and torch.equal(q.scales, s) and torch.equal(q.offsets, m)
        W = q.dequantize()
        file = quant.file_state(q)  # ... and checkpoints get rows
        assert set(file) == {"qweight", "scales", "offsets"}
        assert torch.equal(file["qweight"], codes) and torch.equal(file["scales"], s) and torch.equal(file["offsets"], m)
        assert {k: tuple(v.shape) for k, v in file.items()} == q.file_shapes()
        if int4_mm() is not None:
            q.backend = "ours"
            q(torch.randn(2, 128))
            assert torch.equal(q.qweight, wt) and torch.equal(q.sm, sm)  # a forward converts nothing
        assert torch.equal(q.dequantize(), W)
        fresh = quant.Int4Linear(128, n, 32)
        fresh.load_state_dict(q.state_dict())  # the in-memory layout round-trips as it is
        assert torch.equal(fresh.dequantize(), W)
        state = dict(file)
        assert quant.checkpoint._tile_file_int4(state, [""]) == []  # "": the root module
        fresh2 = quant.Int4Linear(128, n, 32)
        fresh2.load_state_dict(state)  # from the file format, tiled once
        assert torch.equal(fresh2.qweight, wt) and torch.equal(fresh2.dequantize(), W)
        x = torch.randn(3, 128)
        for mod in (fresh, fresh2):
            mod.backend = q.backend
            torch.testing.assert_close(mod(x), q(x), rtol=0, atol=0)


def test_gptq_has_lower_output_error_than_rtn():
    torch.manual_seed(0)
    n, k = 64, 128
    w = torch.randn(n, k) * 0.05
    # correlated inputs with uneven scales: what makes GPTQ's error feedback matter
    x = torch.randn(2048, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k)) * torch.linspace(0.2, 3, k)
    H = 2 * x.T @ x / x.shape[0]
    for sym in (False, True):
        rtn = quant.dequantize_int4(*quant.quantize_int4(w, 32, sym))
        gq = quant.dequantize_int4(*quant.gptq_int4(w, H, 32, sym))
        e_rtn, e_gptq = ((x @ (rtn - w).T) ** 2).mean(), ((x @ (gq - w).T) ** 2).mean()
        assert e_gptq < 0.8 * e_rtn, (sym, float(e_gptq), float(e_rtn))


def _tiny(seed=0, **kw):
    cfg = config_from_name("tiny", **kw) if kw else config_from_name("tiny")
    torch.manual_seed(seed)
    model = Phi3(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger weights than the init so that quantization error reaches the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def _greedy(model, prompt, n=12):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


@pytest.mark.parametrize("bits,embed_bits", [(4, None), (4, 8), (8, None)])
def test_quantized_model_saves_reloads_and_generates_the_same_tokens(tmp_path, trained_tokenizer, bits, embed_bits):
    model = _tiny()
    quant.quantize(model, bits=bits, group_size=32, embed_bits=embed_bits)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Int4Linear" in kinds) == (bits == 4) and ("Int8Embedding" in kinds) == (embed_bits == 8)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    prompt = [5, 17, 42, 9]
    before = _greedy(model, prompt)
    quant.save_quantized(model, tmp_path / "q", trained_tokenizer)
    loaded, tok = quant.load_quantized(tmp_path / "q")
    assert tok is not None and loaded.quant_config["modules"] == model.quant_config["modules"]
    assert _greedy(loaded, prompt) == before
    x = torch.tensor([prompt * 3])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_and_generate_cli_open_a_quantized_folder(tmp_path, trained_tokenizer):
    """`phiforge.load` (and so generate / chat / serve / eval) opens what `phiforge quantize` writes."""
    import subprocess
    import sys

    from phiforge import load
    from phiforge.checkpoint import build_model
    from phiforge.models.phi3 import Phi3Config

    tok = trained_tokenizer
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    model = build_model(cfg).eval()
    quant.quantize(model, bits=4, group_size=32)
    quant.save_quantized(model, tmp_path / "q", tok)
    loaded, tok2 = load(str(tmp_path / "q"))
    assert tok2 is not None and any(type(m).__name__ == "Int4Linear" for m in loaded.modules())
    x = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    proc = subprocess.run([sys.executable, "-m", "phiforge.cli", "generate", str(tmp_path / "q"), "--prompt", "Once",
                           "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_quantized_model_stays_close_to_fp32():
    model = _tiny(seed=1)
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref = torch.log_softmax(model(x), -1)
        quant.quantize(model, bits=4, group_size=32)
        got = torch.log_softmax(model(x), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert 0 < kl < 0.05, float(kl)


def test_gptq_quantize_model_runs_and_rejects_missing_calibration():
    model = _tiny(seed=2)
    with pytest.raises(UserError, match="calibration"):
        quant.quantize(model, bits=4, group_size=32, method="gptq", calib=None)
    calib = torch.randint(0, 512, (4, 32))
    quant.quantize(model, bits=4, group_size=32, method="gptq", calib=calib)
    assert model.quant_config["method"] == "gptq"
    assert isinstance(model.model.layers[1].mlp.down_proj, quant.Int4Linear)
    assert torch.isfinite(model(calib[:1])).all()


def test_bad_group_size_and_bits_are_user_errors():
    with pytest.raises(UserError, match="divisible"):
        quant.quantize(_tiny(), bits=4, group_size=96)
    with pytest.raises(UserError, match="bits"):
        quant.quantize(_tiny(), bits=3)
    from phiforge.utils import run_main

    assert run_main(quant_cli.main, ["tiny", "--bits", "4", "--group-size", "48", "--out", "/nonexistent/x"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_generates_with_a_quantized_model(dtype):
    """The engine (phiforge.generate) runs the swapped modules unchanged: same greedy tokens as a plain loop."""
    from phiforge.generate import generate

    model = _tiny(seed=4).to(dtype)
    quant.quantize(model, bits=4, group_size=32, embed_bits=8)
    for m in model.modules():  # one exact path for every shape; "auto" may pick different kernels for
        if isinstance(m, quant.Int4Linear):  # prefill and decode, whose roundings can flip near-tied argmaxes
            m.backend = "dequant"
    prompt = [3, 14, 15, 92, 6]
    result = generate(model, None, prompt, max_new_tokens=8, stop_ids=[])
    result = result[0] if isinstance(result, list) else result
    assert result.token_ids == _greedy(model, prompt, 8)[len(prompt):]


def test_falls_back_cleanly_without_the_kernel(monkeypatch):
    """No compiler / no AVX2: kernels.int4_mm() is None and the auto path still computes the same product."""
    import phiforge.kernels as kernels

    monkeypatch.setitem(kernels._state, "int4_mm", None)
    assert kernels.int4_mm() is None
    for n in (64, 40):  # 64: aten's kernel applies (N % 16 == 0); 40: pure dequant fallback
        q = quant.Int4Linear.from_linear(_linear(n, 128), group_size=32)
        x = torch.randn(5, 128)
        assert q._pick(x) == ("torch" if n == 64 else "dequant")
        torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=2e-2, atol=2e-2)


def test_no_compiler_means_pure_torch_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    # aten's int4 kernel rounds activations to bf16: over 200 seeds its max error was <= 0.77 % of the output's
    # largest value (0.0117 absolute: the former atol=1e-2 on an unseeded draw failed about 1 run in 200)
    code = ("import torch; from phiforge import quant; from phiforge.kernels import int4_mm; torch.manual_seed(0); "
            "q = quant.Int4Linear.from_linear(torch.nn.Linear(64, 48, bias=False), 32); x = torch.randn(2, 64); "
            "ref = x @ q.dequantize().T; "
            "print(int4_mm(), q._pick(x), bool((q(x) - ref).abs().max() <= 0.02 * ref.abs().max()))")
    env = dict(os.environ, CXX="/nonexistent/c++", PHIFORGE_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "torch", "True"]


def test_int4_kernel_runs_inside_torch_compile():
    """The kernel has a shape rule (register_fake), so a compiled decode step keeps it in the graph, no break.
    One compiled Int4Linear equals eager bit for bit. A whole compiled model cannot: inductor's fused norms and
    attention differ from eager by ~1e-7, and rounding activations to int8 turns a few of those into one-step
    flips (a 1e-6 nudge of the embeddings moves this model's eager logits by ~0.04), so the model-level check is a
    relative error far below what a wrong layout or scale would give (~1)."""
    from phiforge.kernels import int4_mm

    if int4_mm() is None:
        pytest.skip("C++ int4 kernel unavailable here (no AVX2/F16C CPU, compiler or ninja)")
    import torch._dynamo

    q = quant.Int4Linear.from_linear(_linear(80, 256), group_size=32)
    q.backend = "ours"
    x = torch.randn(5, 256)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(q, dynamic=False)(x), q(x), rtol=0, atol=0)
    model = _tiny(seed=5)
    quant.quantize(model, bits=4, group_size=32)
    cache = model.make_cache(1, 8)
    ids, pos = torch.tensor([[3, 14, 15, 92]]), torch.arange(4)
    with torch.no_grad():
        eager = model(ids, positions=pos, cache=cache, cache_slots=pos)  # builds the tiles
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, positions=pos, cache=cache, cache_slots=pos)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, dynamic=False)(ids, positions=pos, cache=cache, cache_slots=pos)
    assert float((compiled - eager).norm() / eager.norm()) < 0.05
