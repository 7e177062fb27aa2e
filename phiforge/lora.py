"""LoRA as a module swap (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: (r, in) Kaiming-uniform,  B: (out, r) zeros

`apply_lora(model, targets)` swaps the named projections (default: qkv_proj, o_proj, gate_up_proj, down_proj) for
`LoRALinear`s after the model is built, so the model files never mention adapters. The base may be any module mapping
x -> y with `in_features`/`out_features` (nn.Linear or a quantized linear: LoRA over a 4-bit base is QLoRA).
`disable_adapters(model)` gives the base model back for the LoRA-DPO reference without a second copy (torchtune
`disable_adapter`). `merge_lora(model)` folds B @ A into the base weights.

Adapters are saved in PEFT's format (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads them on transformers' Phi-3.
References (read, not copied): peft src/peft/tuners/lora/layer.py (init, scaling) and utils/save_and_load.py (key
names), PEFT 0.21.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from phiforge.utils import UserError, atomic_write_bytes, atomic_write_json, read_json, set_module



def _dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device | None]:
    """LoRA weights take the dtype of the base's float weight; over a quantized base (packed codes, fp16 scales)
    they are fp32, since Adam's eps underflows in fp16."""
    params = [p for p in base.parameters() if p.is_floating_point()]
    tensors = list(base.parameters()) + list(base.buffers())
    dtype = params[0].dtype if params and isinstance(base, nn.Linear) else torch.float32
    return dtype, (tensors[0].device if tensors else None)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"LoRA needs a base with in_features/out_features, got {type(base).__name__}")
        if r <= 0:
            raise UserError(f"LoRA rank must be positive, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dtype, device = _dtype_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_parameters()

    @classmethod
    def from_base(cls, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "LoRALinear":
        return cls(base, r, alpha, dropout)

    def reset_parameters(self) -> None:
        """PEFT's default: A Kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter leaves the model unchanged."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        a = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)

    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding base + (alpha/r) B A. A quantized base is dequantized first (it must offer
        `dequantize()` returning the (out, in) weight)."""
        if isinstance(self.base_layer, nn.Linear):
            w, bias = self.base_layer.weight, self.base_layer.bias
        elif hasattr(self.base_layer, "dequantize"):
            w, bias = self.base_layer.dequantize(), getattr(self.base_layer, "bias", None)
        else:
            raise UserError(f"cannot merge LoRA into a {type(self.base_layer).__name__} (no dequantize())")
        dtype = w.dtype if w.is_floating_point() else torch.float32
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype, device=w.device)
        with torch.no_grad():
            merged.weight.copy_((w.float() + self.delta_weight().to(w.device)).to(dtype))
            if bias is not None:
                merged.bias.copy_(bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, disabled={self.disabled}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets=None, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               freeze_base: bool = True) -> list[str]:
    """Swap every module whose last name component is in `targets` (default: the model's `lora_targets`) for a
    LoRALinear; freeze everything else. Returns the swapped module names."""
    default = tuple(getattr(model, "lora_targets", ()))
    targets = set(default if targets is None else targets)
    names = [n for n, m in model.named_modules() if n.rpartition(".")[2] in targets and not isinstance(m, LoRALinear)
             and hasattr(m, "in_features") and ".base_layer" not in n]
    if not names:
        raise UserError(f"no module named {sorted(targets)} to put LoRA on; this model's projections are "
                        f"{', '.join(default) or '(none declared)'}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        base = model.get_submodule(n)
        set_module(model, n, LoRALinear.from_base(base, r, alpha, dropout).train(base.training))
    return names


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every LoRALinear returns its base output: the reference model for LoRA-DPO."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear (in place); the model is then a plain Phi3 again."""
    for name, m in lora_modules(model).items():
        merged = m.merge()
        merged.weight.requires_grad_(False)
        set_module(model, name, merged)
    return model


# ----------------------------------------------------------------------------------------------------------------
# PEFT-format save / load

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names: base_model.model.<module>.lora_{A,B}.weight (the adapter name "default" is not stored)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise UserError("save_adapter supports one rank and alpha for all adapters")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({n.rpartition(".")[2] for n in mods})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": targets,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save(adapter_state_dict(model), metadata={"format": "pt"}))
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Put the adapter saved in `folder` (PEFT format, ours or peft's) on `model`; returns the adapted module names."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise UserError(f"{folder} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; "
                        "pickled adapter_model.bin files are never opened)")
    cfg = read_json(folder / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") \
            or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise UserError(f"{folder}: only plain LoRA adapters are supported (no DoRA/rsLoRA/per-layer ranks/bias)")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    names = apply_lora(model, targets, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0))
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{folder / ADAPTER_WEIGHTS} is not readable safetensors: {e}") from None
    expected = adapter_state_dict(model)
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(f"{folder}: adapter tensors do not match the model "
                        f"(missing {missing[:2]}, unexpected {extra[:2]})")
    mods = lora_modules(model)
    with torch.no_grad():
        for key, t in state.items():
            name, _, rest = key.removeprefix("base_model.model.").rpartition(".lora_")
            lin = getattr(mods[name], "lora_" + rest.split(".")[0])
            if tuple(t.shape) != tuple(lin.weight.shape):
                raise UserError(f"{folder}: {key} has shape {tuple(t.shape)}, "
                                f"the model needs {tuple(lin.weight.shape)}")
            lin.weight.copy_(t)
    return names


def prepare_qlora_base(model: nn.Module, group_size: int = 64) -> nn.Module:
    """QLoRA base (Dettmers et al. 2023): every block linear and lm_head to group-wise int4 (phiforge.quant, RTN),
    frozen. The int4 modules run their differentiable dequantize + matmul path so gradients reach the adapters of
    earlier layers through them (the fused CPU kernels are inference-only)."""
    try:
        from phiforge.quant import Int4Linear, quantize
    except ImportError:
        raise UserError("QLoRA needs phiforge.quant (int4 weights), which this install lacks; use plain LoRA") from None
    quantize(model, bits=4, group_size=group_size)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.backend = "dequant"
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
