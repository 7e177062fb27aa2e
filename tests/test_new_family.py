"""A new model family plugs in by convention, touching no shared code: a module `phiforge.models.<model_type>` with
`ModelConfig`, `PRESETS` and `Model` that meets the contract in phiforge/models/__init__.py. The toy family below
(a bigram model, a few lines) is registered the way a file phiforge/models/toy_bigram.py would be found (as that
module), then saved, loaded by its config.json's model_type, generated from (one stream and a batch), fine-tuned
with SFT + LoRA through the CLI stage, and loaded back."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from phiforge import load, models
from phiforge.checkpoint import save_hf_folder
from phiforge.generate import generate
from phiforge.models.cache import KVCache
from phiforge.models.loss import lm_head_loss


@dataclass
class ToyConfig:
    model_type: ClassVar[str] = "toy_bigram"
    vocab_size: int = 64
    hidden_size: int = 32
    max_position_embeddings: int = 256
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 0
    num_hidden_layers: int = 0  # no attention layers, so nothing to cache but positions
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope_scaling: dict | None = None
    original_max_position_embeddings: int = 256

    @classmethod
    def from_hf(cls, hf: dict) -> "ToyConfig":
        return cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def num_params(self) -> int:
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size * (self.hidden_size + 1)


class ToyBigram(nn.Module):
    """logits(x_t) = lm_head(tanh(proj(embed(x_t)))): the next token depends on the current one only."""
    lora_targets = ("proj",)

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config, self.gradient_checkpointing = cfg, False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    embed = property(lambda self: self.embed_tokens)
    head = property(lambda self: self.lm_head)
    device = property(lambda self: self.proj.weight.device)

    def init_weights(self, seed=None):
        gen = torch.Generator().manual_seed(seed or 0)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen))

    def init_buffers(self):
        pass

    def make_cache(self, batch, slots, dtype=None, device=None):
        return KVCache(0, batch, slots, 1, 1, device=device or self.device)

    def forward(self, input_ids, positions=None, cache=None, cache_slots=None, attn_mask=None, long_rope=None,
                return_hidden=False, targets=None, ignore_index=-100):
        if cache is not None:
            cache.pos[:, cache_slots] = positions
        h = torch.tanh(self.proj(self.embed_tokens(input_ids)))
        if return_hidden:
            return h
        return self.lm_head(h) if targets is None else lm_head_loss(self.lm_head, h, targets, ignore_index)


@pytest.fixture
def toy_family(monkeypatch):
    mod = types.ModuleType("phiforge.models.toy_bigram")
    mod.ModelConfig, mod.Model, mod.PRESETS = ToyConfig, ToyBigram, {}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


@pytest.fixture
def toy_folder(tmp_path, toy_family, trained_tokenizer):
    tok = trained_tokenizer
    cfg = ToyConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                    pad_token_id=tok.pad_id)
    model = models.build(cfg)
    model.init_weights(seed=3)
    return save_hf_folder(model, tmp_path / "toy", tok)


def greedy_chain(model, first: int, n: int) -> list[int]:
    """The bigram model's greedy continuation, computed directly from its weights."""
    out, t = [], first
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([[t]]))[0, -1].argmax())
            out.append(t)
    return out


def test_a_toy_family_loads_and_generates_by_its_model_type(toy_folder):
    assert json.loads((toy_folder / "config.json").read_text())["model_type"] == "toy_bigram"
    model, tok = load(str(toy_folder))
    assert isinstance(model, ToyBigram) and tok is not None
    prompts = ["Tom and Lily", "The quick brown fox"]
    one = generate(model, tok, prompts[0], max_new_tokens=12, stop_ids=())  # the single-stream path
    ids = tok.encode(prompts[0])
    assert one.token_ids == greedy_chain(model, ids[-1], 12)
    both = generate(model, tok, prompts, max_new_tokens=12, stop_ids=())  # continuous batching
    assert [r.token_ids for r in both] == [one.token_ids, greedy_chain(model, tok.encode(prompts[1])[-1], 12)]


def test_a_toy_family_fine_tunes_with_lora_through_sft(tmp_path, toy_folder):
    from phiforge.train import sft

    chats = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ["the dog", "a ball", "the park", "Lily", "Tom", "the fox"] * 4]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "sft"
    assert sft.main(["--model", str(toy_folder), "--data", str(data), "--out", str(out), "--set", "max_steps=3",
                     "--set", "lora=true", "--set", "lr=0.05", "--set", "batch_size=4", "--set", "seq_len=64",
                     "--set", "val_frac=0", "--set", "end_eval=0", "--set", "threads=1", "--set", "log_every=1"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["proj"]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert len(losses) == 3 and losses[-1] < losses[0]  # one LoRA swap, three training steps that learn
    base, _ = load(str(toy_folder))
    tuned, _ = load(str(out / "final"))  # LoRA merged back into a plain toy model
    assert isinstance(tuned, ToyBigram)
    assert not torch.equal(tuned.proj.weight, base.proj.weight)  # the adapter was trained and merged
    assert torch.equal(tuned.lm_head.weight, base.lm_head.weight)  # everything else stayed frozen
