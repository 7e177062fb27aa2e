"""Model families, one file per Hugging Face `model_type`, found by convention (as mlx-lm finds its models).

`config.json`'s `model_type` names the module: "phi3" -> `phiforge/models/phi3.py`; the MoE, small and vision
families add `phimoe.py`, `phi3small.py` and `phi3_v.py`. No registry, no class names as strings: a new family is
a new file. Everything outside `models/` (engine, training, LoRA, quantization, export, serving, eval) uses the
contract below and nothing else; nothing in `models/` imports from those layers.

The contract, which every model file meets
------------------------------------------
The module exposes:
    ModelConfig   a dataclass with
                  - `model_type` (class attribute, equal to the module's name),
                  - `from_hf(config_json: dict)` and `to_hf() -> dict` (round-trips with transformers),
                  - the fields the engine reads: vocab_size, hidden_size, num_hidden_layers, max_position_embeddings,
                    bos_token_id, eos_token_id, pad_token_id, tie_word_embeddings, sliding_window (None or the
                    trained window), rope_scaling (None, or LongRoPE's dict) and original_max_position_embeddings,
                  - `num_params()`; `dataclasses.replace(cfg, field=value)` gives a changed copy.
    PRESETS       {name: dict of ModelConfig fields} (may be empty); `config_from_name(name)` builds one.
    Model         an nn.Module built as `Model(cfg)` whose state-dict names equal the HF checkpoint's, with
        .config                         the ModelConfig
        .forward(input_ids (B, T), positions=None (B, T) or (T,), cache=None, cache_slots=None (T,),
                 attn_mask=None (B, 1, T, S) bool, long_rope=None, return_hidden=False, targets=None (B, T),
                 ignore_index=-100)
                                        -> logits (B, T, V); hidden (B, T, C) with return_hidden; the mean
                                           next-token loss with targets (already shifted: models/loss.py).
                                           Position -1 marks padding. With a cache, the model writes
                                           `cache.pos[:, cache_slots] = positions` and attends to every slot.
                                           long_rope: None = transformers' rule, True/False forces the regime.
        .make_cache(batch, slots, dtype=None, device=None) -> a models.cache.KVCache (the engine views and
                                           compacts its rows and slots)
        .init_weights(seed=None)        the family's initialisation, in place
        .init_buffers()                 recompute non-persistent tables (rotary) after a meta-device build
        .embed                          the token-embedding module (input ids -> (.., C))
        .head                           the module mapping final hidden states (.., C) -> logits (.., V)
        .device                         where the weights live
        .lora_targets                   leaf names of the Linears LoRA adapts by default
        .keep_float                     leaf names of block Linears quantization leaves in full precision
                                        (optional, default none: PhiMoE's router `gate`)
        .gradient_checkpointing         a bool the training loop may set
    Optional, for mixture-of-experts families (the trainers log it; a dense model leaves it out):
        .pop_expert_load()              (L, E) int64 tokens routed to each expert of each layer by training-mode
                                        forwards since the last call, which resets the counts
    Quantization and LoRA find their Linears by walking `named_modules()` for nn.Linear (names as in the checkpoint)
    and swap them in place; a model never tests what its Linears have become. Kernel swaps for inference are
    fast.prepare_for_inference(model), called once at load.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from phiforge.utils import UserError

DEFAULT_MODEL_TYPE = "phi3"  # config.json files of the first Phi-3 releases omit nothing, but be lenient


def family(model_type: str) -> ModuleType:
    """The model file for `model_type` (phiforge.models.<model_type>)."""
    if not model_type.isidentifier():
        raise UserError(f"model_type {model_type!r} is not a valid module name")
    try:
        return importlib.import_module(f"{__name__}.{model_type}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{model_type}":
            raise
        raise UserError(f"model_type {model_type!r} is not supported: phiforge has model files for "
                        f"{', '.join(known_model_types())} (phiforge/models/<model_type>.py)") from None


def known_model_types() -> list[str]:
    """The model files present (shared helpers such as loss.py define no ModelConfig)."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if hasattr(importlib.import_module(f"{__name__}.{n}"), "ModelConfig"))


def config_from_hf(hf: dict):
    """A ModelConfig from a Hugging Face config.json dict, by its model_type."""
    return family(hf.get("model_type") or DEFAULT_MODEL_TYPE).ModelConfig.from_hf(hf)


def presets() -> dict[str, ModuleType]:
    """Every named preset of every model file -> the file that defines it."""
    return {name: fam for t in known_model_types() for fam in [family(t)] for name in getattr(fam, "PRESETS", {})}


def config_from_name(name: str, **changes):
    """The ModelConfig of a named preset (`phiforge inspect` lists them), with fields changed by `changes`."""
    fams = presets()
    if name not in fams:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(fams)}")
    return fams[name].ModelConfig(**{**fams[name].PRESETS[name], **changes})


def build(cfg):
    """An uninitialised Model for a ModelConfig of any family."""
    return family(cfg.model_type).Model(cfg)
