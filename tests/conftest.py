"""Shared test fixtures: tiny models built as transformers' Phi3ForCausalLM, a tokenizer trained in the test."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("PHIFORGE_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
SMOKE_LIMIT_S = 180  # issue 10: the smoke recipe runs end to end in CI in under 3 minutes

SAMPLE_TEXT = (
    "Once upon a time there was a little robot named Pip. Pip liked to count stars. "
    "One night Pip counted 1, 2, 3... and then a cloud came! \"Oh no,\" said Pip. "
    "def add(a, b):\n    return a + b\n\nUnicode: café, naïve, 東京, emoji 🙂, math ∑ x² ≤ ∞.\n"
)


def hf_config(cfg, window_plus_one: bool = True):
    """transformers' Phi3Config for our config. transformers 5 masks `sliding_window` keys including the query,
    the checkpoints were trained with sliding_window + 1 (PHI3_SPEC 2.2): pass window + 1 to get the trained
    semantics in the reference."""
    from transformers import Phi3Config as HFPhi3Config

    d = cfg.to_hf()
    if window_plus_one and d["sliding_window"] is not None:
        d["sliding_window"] = d["sliding_window"] + 1
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    hf = HFPhi3Config(**d)
    hf._attn_implementation = "eager"
    return hf


def hf_model(cfg, seed: int = 0):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1; perturb so that every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="session")
def trained_tokenizer():
    from phiforge.tokenizer import train_bpe

    corpus = [SAMPLE_TEXT * 3, "The quick brown fox jumps over the lazy dog. " * 20,
              "Tom and Lily went to the park. They saw a big red ball. " * 20]
    return train_bpe(corpus, vocab_size=400)


def with_bos_post_processor(tok, **config):
    """`tok` with a tokenizer.json post-processor that prepends <s> (a TemplateProcessing, as in the released Phi-3
    tokenizer.json) and no add_bos_token / add_eos_token in its config unless given: then the post-processor alone
    decides, in transformers as in phiforge."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    from phiforge.tokenizer import Tokenizer

    backend = HFTokenizer.from_str(tok.backend.to_str())  # a copy: the session's tokenizer stays as it is
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                           special_tokens=[("<s>", tok.bos_id)])
    cfg = {k: v for k, v in tok.config.items() if k not in ("add_bos_token", "add_eos_token")}
    return Tokenizer(backend, {**cfg, **config}, {"eos_token_id": sorted(tok.stop_ids)})


def wait_for(pred, what: str, timeout: float = 20.0):
    """Poll pred() until it holds (a server's state, seen from a test); fail naming `what` after timeout seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run_recipe(out: Path, *extra: str, timeout: float = SMOKE_LIMIT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "phiforge.cli", "recipe", "--smoke", "--quiet", "--out", str(out),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def saved_random_model(tok, folder, **changes):
    """The tiny Phi-3 preset (with `changes`) over `tok`'s vocabulary, random weights scaled x4 (fewer near-ties,
    less repetitive random text), saved with the tokenizer and loaded back: (model, tokenizer, folder)."""
    from phiforge import load
    from phiforge.checkpoint import save_hf_folder
    from phiforge.models import config_from_name
    from phiforge.models.phi3 import Phi3

    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                           pad_token_id=tok.pad_id, **changes)
    torch.manual_seed(0)
    model = Phi3(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    save_hf_folder(model.eval(), folder, tok)
    model, tok = load(str(folder))
    return model, tok, folder


@pytest.fixture(scope="session")
def served_model(trained_tokenizer, tmp_path_factory):
    """A tiny Phi-3 saved with the trained tokenizer, as `phiforge serve` loads it: (model, tokenizer, folder).
    Shared by test_serve.py and test_chat_page.py; read-only."""
    return saved_random_model(trained_tokenizer, tmp_path_factory.mktemp("served"), max_position_embeddings=1024,
                              original_max_position_embeddings=1024)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`phiforge recipe --smoke`, once per session: (OUT, the finished process, seconds). test_recipe.py checks the
    run; test_docs_commands.py runs the documented commands on its model. Read-only for both."""
    out = tmp_path_factory.mktemp("recipe") / "smoke"
    t0 = time.time()
    r = run_recipe(out)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, seconds
