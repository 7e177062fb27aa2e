"""phiforge: the Phi-3 system from scratch.

    from phiforge import load
    model, tokenizer = load("path/to/Phi-3-mini-4k-instruct", dtype="bfloat16")
    logits = model(input_ids)  # (B, T, vocab)
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path_or_preset: str, dtype="float32", device: str = "cpu", seed: int = 0):
    """Load an HF model folder (or Hub repo id), or build a named preset with random weights.
    Returns (model, tokenizer); tokenizer is None for a preset or a folder without tokenizer files."""
    import torch

    from phiforge import models
    from phiforge.checkpoint import build_model, load_hf_folder, resolve_dtype
    from phiforge.tokenizer import Tokenizer

    dtype = resolve_dtype(dtype)
    if path_or_preset in models.presets() and not Path(path_or_preset).exists():
        torch.manual_seed(seed)
        model = build_model(models.config_from_name(path_or_preset), dtype, device, init=False)
        model.init_weights(seed=seed)
        return model.to(dtype).eval(), None
    folder = Path(path_or_preset)
    if (folder / "quant_config.json").exists():  # written by `phiforge quantize`
        from phiforge.quant import load_quantized
        return load_quantized(folder, dtype=dtype, device=device)
    model = load_hf_folder(path_or_preset, dtype=dtype, device=device)
    return model, Tokenizer.from_folder_or_none(folder)


__all__ = ["load", "__version__"]
