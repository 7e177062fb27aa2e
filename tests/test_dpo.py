"""`phiforge dpo` on a tiny model: preference formats, skip counts, reference log-probs computed once and cached
(and reused on resume), LoRA-DPO with the reference = adapters switched off, held-out reward metrics."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from phiforge.checkpoint import load_hf_folder, save_hf_folder
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.train import dpo
from phiforge.train.chat_data import build_pairs, parse_hh, to_preference

COLORS = ["red", "blue", "green", "pink", "black", "white", "brown", "gold"]
THINGS = ["ball", "cat", "dog", "car", "hat", "cup", "tree", "box"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen answers state the color given in the prompt; rejected ones refuse or name a different color."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, t = rng.choice(COLORS), rng.choice(THINGS)
        wrong = rng.choice([x for x in COLORS if x != c])
        rejected = rng.choice([f"The {t} is {wrong}.", "I don't know.", f"No. The {t} is {wrong}!"])
        out.append({"prompt": f"The {t} is {c}. What color is the {t}?", "chosen": f"Sure! The {t} is {c}.",
                    "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, trained_tokenizer):
    folder = tmp_path_factory.mktemp("dpo_base")
    tok = trained_tokenizer
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    torch.manual_seed(0)
    model = Phi3(cfg)
    model.init_weights(seed=1)
    save_hf_folder(model, folder, tok)
    return folder


def test_preference_formats(trained_tokenizer):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen joke?\n\nAssistant: No, sorry.",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a pen joke?\n\nAssistant: Sure, here is one."}
    prompt, c, r = to_preference(hh)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"] and c == "No, sorry." and \
        r == "Sure, here is one."
    sg = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
          "rejected": {"from": "gpt", "value": "bad"}}
    assert to_preference(sg) == ([{"role": "user", "content": "q"}], "good", "bad")
    conv = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    assert to_preference(conv) == ([{"role": "user", "content": "q"}], "good", "bad")
    ae = {"instruction": "q", "output_1": "one", "output_2": "two", "preference": 2}
    assert to_preference(ae) == ([{"role": "user", "content": "q"}], "two", "one")
    assert parse_hh("\n\nHuman: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]

    records = [sg, hh, {"prompt": "q", "chosen": "", "rejected": "bad"},  # empty answer
               {"instruction": "q", "output_1": "a", "output_2": "b", "preference": 0},  # tie
               {"prompt": "q", "chosen": "long " * 300, "rejected": "x"},  # too long
               {"conversations": [{"value": "no role"}], "chosen": {"value": "a"}, "rejected": {"value": "b"}}]
    pairs, report = build_pairs(records, trained_tokenizer, max_len=128)
    assert report.kept == 2 and report.skipped == {"empty_answer": 1, "tie": 1, "too_long": 1, "missing_role": 1}
    (cw, mw), (cl, ml) = pairs[0]
    tok = trained_tokenizer
    assert tok.decode([t for t, m in zip(cw, mw) if m]) == "good<|end|>\n" + tok.eos_token
    assert tok.decode([t for t, m in zip(cl, ml) if m]) == "bad<|end|>\n" + tok.eos_token


def write_pairs(tmp_path, n):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(n)))
    return str(p)


def run(out, data, base, *extra):
    return dpo.main(["--model", str(base), "--out", str(out), "--data", data, "--seq_len", "128",
                     "--batch_size", "8", "--val_frac", "0.2", "--log_every", "1", "--threads", "1", "--beta", "0.5",
                     "--schedule", "constant", "--warmup_steps", "0", *extra])


def test_dpo_improves_held_out_reward_accuracy_and_resumes_from_cache(tmp_path, base_model):
    data = write_pairs(tmp_path, 200)
    assert run(tmp_path / "a", data, base_model, "--max_steps", "30", "--lr", "1e-3", "--eval_every", "30",
               "--ckpt_every", "15") == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first_val = next(r for r in rows if r["step"] == 0)
    assert first_val["val_rewards/margins"] == 0.0  # policy == reference before the first step
    final = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert final["n_val"] == 40
    assert final["val_rewards/accuracies"] >= 0.75, final  # held-out pairs: the preference generalises
    assert final["val_rewards/margins"] > 0 and final["val_loss"] < first_val["val_loss"]
    cache = load_file(str(tmp_path / "a" / "ref_logps.safetensors"))
    assert cache["train_w"].shape == (160,) and cache["val_w"].shape == (40,)

    # resume from step 15: the cached reference (not the moved policy) is used, and the run ends where it did
    import shutil
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "ckpt" / "step_00000030")
    shutil.rmtree(b / "final")
    assert run(b, data, base_model, "--max_steps", "30", "--lr", "1e-3", "--eval_every", "30", "--ckpt_every", "15",
               "--resume") == 0
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("loss", ["ipo", "cdpo"])
def test_other_losses_run(tmp_path, base_model, loss):
    data = write_pairs(tmp_path, 40)
    assert run(tmp_path / loss, data, base_model, "--max_steps", "3", "--lr", "1e-3", "--loss", loss,
               "--label_smoothing", "0.1", "--export", "false") == 0
    rows = [json.loads(x) for x in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert all(map(lambda r: all(v == v for v in r.values() if isinstance(v, float)), rows))  # no NaN


def test_lora_dpo_reference_is_the_base_with_adapters_off(tmp_path, base_model, trained_tokenizer):
    from phiforge.lora import disable_adapters, load_adapter
    from phiforge.train.dpo import pair_logps

    data = write_pairs(tmp_path, 40)
    assert run(tmp_path / "l", data, base_model, "--max_steps", "4", "--lr", "1e-2", "--lora", "true",
               "--lora_r", "4") == 0
    assert not (tmp_path / "l" / "ref_logps.safetensors").exists()  # no cached copy: adapters off is the ref
    pairs, _ = build_pairs(synthetic_pairs(4, seed=9), trained_tokenizer, 128)
    base = load_hf_folder(base_model)
    ref_w, ref_l, _, _ = pair_logps(base, pairs, trained_tokenizer.pad_id, torch.device("cpu"))
    policy = load_hf_folder(base_model)
    load_adapter(policy, tmp_path / "l" / "adapter")
    with torch.no_grad(), disable_adapters(policy):
        off_w, off_l, _, _ = pair_logps(policy, pairs, trained_tokenizer.pad_id, torch.device("cpu"))
    on_w, _, _, _ = pair_logps(policy, pairs, trained_tokenizer.pad_id, torch.device("cpu"))
    torch.testing.assert_close(off_w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(off_l, ref_l, rtol=0, atol=0)
    assert (on_w - ref_w).abs().max() > 1e-4
    merged = load_hf_folder(tmp_path / "l" / "final")
    m_w, _, _, _ = pair_logps(merged, pairs, trained_tokenizer.pad_id, torch.device("cpu"))
    torch.testing.assert_close(m_w, on_w.detach(), rtol=1e-4, atol=1e-4)
