"""Write a phiforge Phi-3 model as a GGUF file that llama.cpp and Ollama run (architecture "phi3"), or a
Phi-3.5-MoE one (architecture "phimoe"; docs/moe.md says where llama.cpp's runtime departs from the model).

References (read, not copied): llama.cpp convert_hf_to_gguf.py `Phi3MiniModel` (metadata, LongRoPE factor
tensors, sliding window, SentencePiece vocab) and `PhiMoeModel` (experts stacked into one 3-D tensor per
projection), gguf-py `GGUFWriter`, and docs/gguf.md (the file format). tests/test_gguf_llama_cpp.py compares our
PhiMoE file with the converter's, tensor for tensor and key for key.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from phiforge.export import blocks
from phiforge.utils import UserError

# The one HF -> GGUF tensor-name mapping ({i} = block index). Anything not listed here is an error, not a guess.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",  # llama.cpp splits [gate | up] itself
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# PhiMoE (Hub checkpoint names, PHI3_SPEC 5.1): separate biased q/k/v/o, LayerNorms with a bias, a router and
# experts. The experts of a layer are stacked into one (E, out, in) tensor per projection ({e} = expert index), as
# llama.cpp's loader wants them (ffn_gate_exps etc.); w1 is the gate, w3 the up projection, w2 the down projection.
PHIMOE_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    **{f"model.layers.{{i}}.input_layernorm.{p}": f"blk.{{i}}.attn_norm.{p}" for p in ("weight", "bias")},
    **{f"model.layers.{{i}}.self_attn.{hf}_proj.{p}": f"blk.{{i}}.attn_{g}.{p}"
       for hf, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for p in ("weight", "bias")},
    **{f"model.layers.{{i}}.post_attention_layernorm.{p}": f"blk.{{i}}.ffn_norm.{p}" for p in ("weight", "bias")},
    "model.layers.{i}.block_sparse_moe.gate.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "blk.{i}.ffn_gate_exps.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "blk.{i}.ffn_up_exps.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "blk.{i}.ffn_down_exps.weight",
    **{f"model.norm.{p}": f"output_norm.{p}" for p in ("weight", "bias")},
    **{f"lm_head.{p}": f"output.{p}" for p in ("weight", "bias")},
}

# model_type -> (GGUF architecture, name map)
ARCHS = {"phi3": ("phi3", GGUF_NAMES), "phimoe": ("phimoe", PHIMOE_NAMES)}

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def gguf_name(hf_name: str, model_type: str = "phi3") -> str:
    """The GGUF tensor name of an HF tensor. Every expert of a layer gets the same name: the tensor it is
    stacked into (gguf_tensors)."""
    names = ARCHS[model_type][1]
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        if len(parts) > 5 and parts[4] == "experts" and parts[5].isdigit():
            key = ".".join(parts[:2] + ["{i}"] + parts[3:5] + ["{e}"] + parts[6:])
        if key in names:
            return names[key].format(i=parts[2])
    if hf_name in names:
        return names[hf_name]
    raise UserError(f"tensor {hf_name!r} has no GGUF name: only the dense Phi-3 and the PhiMoE layouts can be "
                    "exported")


def gguf_tensors(state: dict[str, torch.Tensor], model_type: str = "phi3") -> dict[str, np.ndarray]:
    """HF-named tensors -> GGUF-named fp32 arrays, each layer's experts stacked in expert order (E, out, in)."""
    out, experts = {}, {}
    for hf_name, t in state.items():
        gname = gguf_name(hf_name, model_type)
        arr = t.detach().cpu().float().numpy()
        if ".experts." in hf_name:
            experts.setdefault(gname, {})[int(hf_name.split(".experts.")[1].split(".")[0])] = arr
        else:
            out[gname] = arr
    for gname, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise UserError(f"{gname}: experts {sorted(by_expert)} are not 0..E-1")
        out[gname] = np.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def _tensor_type(gguf_tensor: str, shape: tuple, kind: str) -> str:
    """Per-tensor format for a file type. Like llama-quantize, norms stay f32 and the output matrix gets more
    bits (q8_0 here, where llama.cpp uses q6_K, which we do not implement); rows that do not fit a block size
    fall back to q8_0, then f16."""
    # The router stays f32 at every type, as in llama.cpp's converter and llama-quantize: its logits pick experts.
    if len(shape) == 1 or kind == "f32" or gguf_tensor.endswith("ffn_gate_inp.weight"):
        return "f32"
    k = shape[-1]
    want = {"f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_k_m": "q4_k"}[kind]
    if kind in ("q4_0", "q4_k_m") and gguf_tensor in ("output.weight", "token_embd.weight"):
        want = "q8_0"
    if want != "f16" and k % blocks.BLOCK[want]:
        want = "q8_0" if k % 32 == 0 else "f16"
    return want


def _file_type(kind: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_k_m": F.MOSTLY_Q4_K_M}[kind]


def _add_metadata(w, cfg, name: str, kind: str) -> None:
    w.add_name(name)
    w.add_type("model")  # general.type, as llama.cpp's converter writes it (adapters say "adapter")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_file_type(_file_type(kind))
    w.add_quantization_version(2)  # GGML_QNT_VERSION, which llama.cpp's converter writes into every file
    # 0 = no sliding window (llama.cpp's convention for phi-4). The value is the HF config's, as llama.cpp expects.
    w.add_sliding_window(cfg.sliding_window or 0)
    if cfg.model_type == "phimoe":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_attn_factors(attn_factor(cfg))


def attn_factor(cfg) -> float:
    """The LongRoPE mscale llama.cpp multiplies cos/sin by, in both regimes. Phi-3: sqrt(1 + ln s / ln orig), as
    llama.cpp's converter writes it. PhiMoE ships explicit short/long mscales that must not be recomputed
    (PHI3_SPEC 3.2: 1.2432 for Phi-3.5-MoE where the formula gives 1.1902, attention logits 9 % too small), and
    the converter ignores them; we write the model's own. llama.cpp has one factor for both regimes: when the two
    differ we write long_mscale (see docs/moe.md)."""
    rs = cfg.rope_scaling
    if cfg.model_type == "phimoe":
        return float(rs["long_mscale"])
    s = cfg.max_position_embeddings / cfg.original_max_position_embeddings
    return math.sqrt(1 + math.log(s) / math.log(cfg.original_max_position_embeddings)) if s > 1.0 else 1.0


def _add_tokenizer(w, tok, vocab_size: int) -> None:
    from gguf import TokenType

    if tok is None:
        raise UserError("the model folder has no tokenizer (tokenizer.json or tokenizer.model); GGUF files carry "
                        "their tokenizer, so save the model with one first")
    if tok.backend is not None:  # tokenizer.json: byte-level BPE ("gpt2" in llama.cpp)
        import json

        data = json.loads(tok.backend.to_str())
        if data["model"]["type"] != "BPE":
            raise UserError(f"tokenizer.json model type {data['model']['type']!r} cannot be exported; BPE only")
        vocab = data["model"]["vocab"]
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [TokenType.UNUSED] * vocab_size
        for t, i in vocab.items():
            if i < vocab_size:
                tokens[i], types[i] = t, TokenType.NORMAL
        for i, t in added.items():
            if i < vocab_size:
                tokens[i] = t["content"]
                types[i] = TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # our train_bpe uses the GPT-2 byte-level regex
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    else:  # SentencePiece (the released Phi-3 tokenizer.model): "llama" vocab with scores
        sp = tok.sp
        tokens, scores = [f"[PAD{i}]" for i in range(vocab_size)], [-10000.0] * vocab_size
        types = [TokenType.UNUSED] * vocab_size
        for i in range(min(sp.GetPieceSize(), vocab_size)):
            tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
            types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                        else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                        else TokenType.NORMAL)
        for t, i in tok.added.items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = t, -1000.0, TokenType.CONTROL
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
    for key, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    if tok.end_id is not None:
        w.add_eot_token_id(tok.end_id)  # <|end|> ends an assistant turn (PHI3_SPEC 10)
    w.add_add_bos_token(bool(tok.add_bos_token))
    w.add_add_eos_token(bool(tok.add_eos_token))
    w.add_chat_template(tok.chat_template)


def float_state(model) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors; quantized modules are dequantized (so a phiforge int4 model exports with double
    rounding: export from the float model when you have it)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "dequantize") and callable(mod.dequantize):
            out[f"{name}.weight"] = mod.dequantize().float()
        elif hasattr(mod, "weight_int8"):  # Int8Embedding
            out[f"{name}.weight"] = mod.weight_int8.float() * mod.scales[:, None]
    for name, p in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in ("qweight", "scales", "offsets", "sm", "weight_int8"):
            continue
        out.setdefault(name, p.float())
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    return out


def export_gguf(model, tokenizer, path, kind: str = "f16", name: str = "phiforge") -> Path:
    """Write `model` (a phiforge Phi3 or PhiMoE, float or quantized) and its tokenizer to a GGUF file,
    atomically."""
    import gguf

    if kind not in TYPES:
        raise UserError(f"unsupported GGUF type {kind!r}; choose one of {', '.join(TYPES)}")
    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise UserError(f"model_type {cfg.model_type!r} cannot be exported to GGUF; supported: {', '.join(ARCHS)}")
    arch, _ = ARCHS[cfg.model_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        _add_metadata(w, cfg, name, kind)
        _add_tokenizer(w, tokenizer, cfg.vocab_size)
        for gname, arr in sorted(gguf_tensors(float_state(model), cfg.model_type).items()):
            fmt = _tensor_type(gname, arr.shape, kind)
            if fmt == "f32":
                w.add_tensor(gname, arr)
            elif fmt == "f16":
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
                         "q4_k": gguf.GGMLQuantizationType.Q4_K}[fmt]
                w.add_tensor(gname, blocks.QUANTIZE[fmt](arr), raw_dtype=qtype)
        if cfg.rope_scaling is not None:  # LongRoPE: llama.cpp reads the factors as tensors
            w.add_tensor("rope_factors_long.weight", np.array(cfg.rope_scaling["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(cfg.rope_scaling["short_factor"], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if tmp.exists():
            tmp.unlink()
        raise
    return path
