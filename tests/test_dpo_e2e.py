"""End to end on the shared data at test scale (CPU): a tiny model briefly pretrained on text ->
`phiforge sft` on ../shared/data/sft (Alpaca demo) -> `phiforge dpo` on ../shared/data/preference (HH-RLHF harmless).
Marked slow: about a minute on two idle cores, several under load. Thresholds are looser than the full run's
(scripts/posttrain_tiny.sh, numbers in docs/posttrain.md) but still fail when the mechanics break: answers must learn to end with <|end|>, and DPO must move held-out rewards the right
way on more than half of the pairs it never saw."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

from phiforge.checkpoint import save_hf_folder
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.train import dpo, sft
from phiforge.utils import shared_dir

SHARED = shared_dir()
pytestmark = [pytest.mark.slow, pytest.mark.needs_shared,
              pytest.mark.skipif(SHARED is None or not (SHARED / "data" / "sft").is_dir(),
                                 reason="needs ../shared/data (sft + preference); set PHIFORGE_SHARED")]


def test_pretrain_sft_dpo_on_shared_data(tmp_path):
    from phiforge.tokenizer import train_bpe
    from phiforge.models.loss import cross_entropy

    data = SHARED / "data"
    alpaca = json.loads((data / "sft" / "alpaca_en_demo.json").read_text())
    short = [r for r in alpaca if len(r["output"]) <= 160 and len(r["instruction"]) + len(r["input"]) <= 200]
    with gzip.open(data / "preference" / "hh-rlhf_harmless-base_test.jsonl.gz", "rt") as fh:
        hh = [json.loads(line) for line in fh]
    hh = [r for r in hh if len(r["chosen"]) <= 500 and len(r["rejected"]) <= 500][:400]
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in alpaca] + \
        [r["chosen"] for r in hh] + [r["rejected"] for r in hh]
    tok = train_bpe(texts, vocab_size=1024)

    # a small "pretrained" model: a few steps of plain LM on the text
    torch.manual_seed(0)
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    model = Phi3(cfg)
    model.init_weights(seed=0)
    stream = [t for x in texts for t in tok.encode(x) + [tok.eos_id]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 129, (16,), generator=g).tolist()
        batch = torch.tensor([stream[s:s + 129] for s in starts])
        loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_hf_folder(model.eval(), tmp_path / "base", tok)
    (tmp_path / "sft.json").write_text(json.dumps(short))
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))

    assert sft.main(["--model", str(tmp_path / "base"), "--data", str(tmp_path / "sft.json"), "--out",
                     str(tmp_path / "sft"), "--seq_len", "256", "--batch_size", "8", "--lr", "3e-3",
                     "--max_steps", "120", "--warmup_steps", "10", "--val_max", "40", "--val_frac", "0.1",
                     "--eval_every", "1000", "--log_every", "10", "--end_eval", "40",
                     "--end_max_new_tokens", "96", "--threads", "2"]) == 0
    sft_eval = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert sft_eval["n"] >= 25 and sft_eval["end_rate"] >= 0.75, sft_eval

    assert dpo.main(["--model", str(tmp_path / "sft" / "final"), "--data", str(tmp_path / "pref.jsonl"),
                     "--out", str(tmp_path / "dpo"), "--seq_len", "256", "--batch_size", "8", "--lr", "1e-3",
                     "--beta", "0.1", "--max_steps", "60", "--warmup_steps", "5", "--val_frac", "0.2",
                     "--eval_every", "1000", "--log_every", "10", "--threads", "2", "--export", "false"]) == 0
    dpo_eval = json.loads((tmp_path / "dpo" / "eval.json").read_text())
    assert dpo_eval["n_val"] >= 60
    assert dpo_eval["val_rewards/accuracies"] > 0.55 and dpo_eval["val_rewards/margins"] > 0, dpo_eval
