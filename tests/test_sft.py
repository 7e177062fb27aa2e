"""`phiforge sft` end to end on a tiny model: trains on assistant tokens, skips bad records with counts, resumes
exactly, exports an HF folder transformers loads, and with LoRA writes a PEFT adapter whose merge is the export."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from phiforge.checkpoint import load_hf_folder, save_hf_folder
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.train import sft

COLORS = ["red", "blue", "green", "pink", "black", "white", "brown", "gold"]
THINGS = ["ball", "cat", "dog", "car", "hat", "cup", "tree", "box"]


def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """A learnable chat task with short answers: name the color, then stop."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, t = rng.choice(COLORS), rng.choice(THINGS)
        out.append({"messages": [{"role": "user", "content": f"The {t} is {c}. What color is the {t}?"},
                                 {"role": "assistant", "content": f"The {t} is {c}."}]})
    return out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, trained_tokenizer):
    folder = tmp_path_factory.mktemp("base")
    tok = trained_tokenizer
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    torch.manual_seed(0)
    model = Phi3(cfg)
    model.init_weights(seed=0)
    save_hf_folder(model, folder, tok)
    return folder


def write_data(tmp_path, n=120):
    chats = synthetic_chats(n)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # empty answer
           {"messages": [{"content": "who am I"}, {"role": "assistant", "content": "x"}]},  # missing role
           {"instruction": "Tell a story.", "input": "", "output": "Once upon a time. " * 200}]  # too long
    p = tmp_path / "chats.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in chats[:n // 2] + bad))
    alpaca = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
              for r in chats[n // 2:]]
    q = tmp_path / "alpaca.json"
    q.write_text(json.dumps(alpaca))
    return [str(p), str(q)]


def common(out, data, base, *extra):
    return ["--model", str(base), "--out", str(out), "--data", *data, "--seq_len", "128", "--batch_size", "4",
            "--val_frac", "0.1", "--eval_every", "1000", "--log_every", "1", "--end_eval", "0", "--threads", "1",
            *extra]


def test_sft_learns_skips_resumes_and_exports(tmp_path, base_model):
    pytest.importorskip("transformers")
    from transformers import Phi3ForCausalLM

    data = write_data(tmp_path)
    args = ["--lr", "3e-3", "--schedule", "constant", "--warmup_steps", "0"]
    assert sft.main(common(tmp_path / "a", data, base_model, "--max_steps", "6", "--ckpt_every", "3", *args)) == 0
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["sft"] == {"kept": 120, "skipped": {"empty_answer": 1, "missing_role": 1, "too_long": 1}}
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "val_loss" in json.loads((tmp_path / "a" / "eval.json").read_text())

    # resume: 3 steps, then continue to 6 from the checkpoint == 6 steps straight
    assert sft.main(common(tmp_path / "b", data, base_model, "--max_steps", "3", "--ckpt_every", "3", *args)) == 0
    assert sft.main(common(tmp_path / "b", data, base_model, "--max_steps", "6", "--ckpt_every", "3", *args,
                           "--resume")) == 0
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # the export is an HF folder: transformers loads it and agrees with phiforge
    ids = torch.tensor([[5, 17, 40, 99, 3, 8]])
    ours = load_hf_folder(tmp_path / "a" / "final")(ids)
    hf = Phi3ForCausalLM.from_pretrained(tmp_path / "a" / "final", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_sft_lora_exports_adapter_and_merged_model(tmp_path, base_model):
    from phiforge.lora import load_adapter

    data = write_data(tmp_path, n=40)
    assert sft.main(common(tmp_path / "l", data, base_model, "--max_steps", "4", "--lora", "true", "--lora_r", "4",
                           "--lr", "1e-2", "--packing", "false")) == 0
    cfg = json.loads((tmp_path / "l" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    ids = torch.tensor([[5, 17, 40, 99, 3, 8]])
    merged = load_hf_folder(tmp_path / "l" / "final")(ids)
    base = load_hf_folder(base_model)
    base_out = base(ids)
    load_adapter(base, tmp_path / "l" / "adapter")
    torch.testing.assert_close(base(ids), merged, rtol=1e-4, atol=1e-4)
    assert (merged - base_out).abs().max() > 1e-4  # the adapter learned something


@pytest.mark.skipif(importlib.util.find_spec("phiforge.quant") is None, reason="QLoRA needs phiforge/quant.py")
def test_sft_qlora_trains_adapters_over_int4_and_exports_float(tmp_path, base_model):
    data = write_data(tmp_path, n=40)
    assert sft.main(common(tmp_path / "q", data, base_model, "--max_steps", "4", "--qlora", "true",
                           "--qlora_group_size", "32", "--lora_r", "4", "--lr", "1e-2")) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < losses[0]
    final = load_hf_folder(tmp_path / "q" / "final")  # a plain float HF folder
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()
    assert torch.isfinite(final(torch.tensor([[5, 17, 40]]))).all()


def test_sft_refuses_when_nothing_fits(tmp_path, base_model):
    from phiforge.utils import UserError

    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="no usable SFT records"):
        sft.main(common(tmp_path / "x", [str(p)], base_model, "--max_steps", "2"))
