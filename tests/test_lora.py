"""LoRA module swap: zero-init identity, merge == adapter model, disable_adapters, PEFT round trip on transformers'
Phi-3 (peft 0.21 `PeftModel.from_pretrained` must load our adapter and give the same logits), QLoRA over Int4Linear."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from phiforge.checkpoint import save_hf_folder
from phiforge.lora import (LoRALinear, apply_lora, disable_adapters, load_adapter, lora_modules,
                           merge_lora, save_adapter)
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config


def tiny_model(seed=0, name="tiny-gqa"):
    torch.manual_seed(seed)
    m = Phi3(config_from_name(name))
    m.init_weights(seed=seed)
    return m.eval()


def randomize_adapters(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.normal_(0, std, generator=g)
            m.lora_B.weight.normal_(0, std, generator=g)


IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def test_zero_init_adapter_is_identity_and_only_lora_trains():
    model = tiny_model()
    ref = model(IDS)
    names = apply_lora(model, r=4, alpha=8)
    assert len(names) == 4 * model.config.num_hidden_layers
    assert {n.rpartition(".")[2] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # the default
    torch.testing.assert_close(model(IDS), ref, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # a gradient step on the adapters changes the output; the base weights stay put
    base_before = model.model.layers[0].self_attn.qkv_proj.base_layer.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(IDS).float().pow(2).mean().backward()
    opt.step()
    assert not torch.allclose(model(IDS), ref)
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.base_layer.weight, base_before)


def test_targets_are_configurable():
    model = tiny_model()
    names = apply_lora(model, targets=["o_proj"], r=2, alpha=2)
    assert all(n.endswith("o_proj") for n in names) and len(names) == model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_merge_equals_adapter_model_and_disable_gives_base():
    model = tiny_model()
    base_out = model(IDS)
    apply_lora(model, r=4, alpha=16, dropout=0.1)  # dropout is inactive in eval mode
    randomize_adapters(model)
    lora_out = model(IDS)
    assert (lora_out - base_out).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), base_out, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), lora_out, rtol=0, atol=0)  # switched back on
    merge_lora(model)
    assert not lora_modules(model)
    assert all(type(m) is torch.nn.Linear for m in [model.model.layers[1].self_attn.qkv_proj,
                                                    model.model.layers[1].mlp.gate_up_proj])
    torch.testing.assert_close(model(IDS), lora_out, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    out = model(IDS)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(IDS), out, rtol=0, atol=0)


def test_peft_loads_our_adapter_on_transformers_phi3(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import Phi3ForCausalLM

    model = tiny_model(seed=3)
    save_hf_folder(model, tmp_path / "base")
    apply_lora(model, targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], r=4, alpha=12)
    randomize_adapters(model, seed=7)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ours = model(IDS)

    hf = Phi3ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, attn_implementation="eager").eval()
    base_hf = hf(IDS).logits
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    assert (theirs - base_hf).abs().max() > 1e-3  # the adapter really was applied
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # and the other way: an adapter written by peft loads into phiforge
    peft_model.save_pretrained(tmp_path / "peft_saved")
    fresh = tiny_model(seed=3)
    load_adapter(fresh, tmp_path / "peft_saved")
    torch.testing.assert_close(fresh(IDS), ours, rtol=1e-5, atol=1e-5)


def test_load_adapter_refuses_non_safetensors(tmp_path):
    from phiforge.utils import UserError

    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle, and never opened")
    with pytest.raises(UserError):
        load_adapter(tiny_model(), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("phiforge.quant") is None,
                    reason="QLoRA needs phiforge/quant.py (issue 7: Int4Linear), not present in this checkout")
def test_qlora_over_int4_base():
    from phiforge.lora import prepare_qlora_base
    from phiforge.quant import Int4Linear

    model = tiny_model(seed=5, name="tiny")
    qmodel = prepare_qlora_base(tiny_model(seed=5, name="tiny"), group_size=32)
    assert isinstance(qmodel.model.layers[0].self_attn.qkv_proj, Int4Linear)
    q_out = qmodel(IDS)
    assert (q_out - model(IDS)).abs().max() < 0.5  # 4-bit error stays small next to the fp32 model
    apply_lora(qmodel, r=4, alpha=8)
    assert all(isinstance(m.base_layer, Int4Linear) for m in lora_modules(qmodel).values())
    torch.testing.assert_close(qmodel(IDS), q_out, rtol=0, atol=0)  # zero-init adapter over the 4-bit base
    params = [p for p in qmodel.parameters() if p.requires_grad]
    assert params and all(p.is_floating_point() for p in params)
    assert all(not b.is_floating_point() or not b.requires_grad for b in qmodel.buffers())
    qmodel.train()
    qmodel(IDS).float().pow(2).mean().backward()
    first = qmodel.model.layers[0].self_attn.qkv_proj
    assert first.lora_B.weight.grad is not None and first.lora_B.weight.grad.abs().sum() > 0  # through int4 layers
    torch.optim.SGD(params, lr=1.0).step()
    qmodel.eval()
    out = qmodel(IDS)
    assert not torch.allclose(out, q_out)
    merge_lora(qmodel)  # dequantize + merge into plain nn.Linear
    assert type(qmodel.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    torch.testing.assert_close(qmodel(IDS), out, rtol=1e-4, atol=1e-4)


def test_lora_wraps_any_linear_like_module():
    class Doubler(torch.nn.Module):
        in_features, out_features = 6, 5

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 6))

        def forward(self, x):
            return 2 * x @ self.w.T

        def dequantize(self):
            return 2 * self.w.detach()

    base = Doubler()
    lora = LoRALinear.from_base(base, r=2, alpha=4)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), base(x))
    torch.nn.init.normal_(lora.lora_B.weight)
    torch.testing.assert_close(lora.merge()(x), lora(x), rtol=1e-5, atol=1e-5)
