"""SFT data: assistant-only masks equal TRL 1.16's (SFTTrainer with assistant_only_loss=True swaps in
trl/chat_templates/phi3_training.jinja with {% generation %} markers), converters, skip-with-counts, and packing that
isolates documents (packed logits == per-document logits)."""
from __future__ import annotations

import pytest
import torch

from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.train.chat_data import (IGNORE, SkipReport, build_sft, check_messages, collate, from_alpaca,
                                      from_sharegpt, masked_nll, pack, to_messages, tokenize_sft)

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful robot."},
     {"role": "user", "content": "Hi Pip, count to three."},
     {"role": "assistant", "content": "1, 2, 3!"},
     {"role": "user", "content": "Now tell me about the fox."},
     {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
     {"role": "user", "content": "Thanks.\nBye"},
     {"role": "assistant", "content": "Bye! \U0001f642 caf\u00e9"}],
    [{"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "    return a + b\n"}],
    [{"role": "user", "content": "Tom and Lily?"},
     {"role": "assistant", "content": "They went to the park."},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": " They saw a big red ball. "}],
]


def test_masks_equal_trl_assistant_only_masks(trained_tokenizer, tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import phi3_chat_template

    from conftest import hf_model

    tok = trained_tokenizer
    assert tok.chat_template == phi3_chat_template  # our template is TRL's Phi-3 template, so TRL patches it
    tok.save(tmp_path / "tok")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                                               eos_token_id=tok.eos_id)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_length=None, report_to=[],
                     dataset_num_proc=None, use_cpu=True)
    trainer = SFTTrainer(model=hf_model(cfg), args=args, processing_class=hf_tok,
                         train_dataset=datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS]))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(CONVERSATIONS))])
    end = tok.end_id
    for i, conv in enumerate(CONVERSATIONS):
        ids, labels = tokenize_sft(tok, conv)
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == labels, f"conversation {i}: masks differ from TRL's"
        assert (batch["labels"][i, n:] == IGNORE).all()
        # each assistant turn's <|end|> is trained; user/system turns are not
        n_turns = sum(m["role"] == "assistant" for m in conv)
        assert sum(1 for t, y in zip(ids, labels) if t == end and y == end) == n_turns
        assert sum(1 for t, y in zip(ids, labels) if t == end and y == IGNORE) == len(conv) - n_turns


def test_mask_covers_exactly_assistant_text(trained_tokenizer):
    tok = trained_tokenizer
    conv = CONVERSATIONS[0]
    ids, labels = tokenize_sft(tok, conv)
    trained = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    expected = "".join(m["content"] + "<|end|>\n" for m in conv if m["role"] == "assistant") + tok.eos_token
    assert trained == expected
    assert tok.decode(ids) == tok.apply_chat_template(conv)


def test_converters():
    assert from_alpaca({"instruction": "Add.", "input": "1 and 2", "output": "3"}) == [
        {"role": "user", "content": "Add.\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    lima = from_alpaca({"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]], "system": "s"})
    assert [m["role"] for m in lima] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in lima] == ["s", "q1", "a1", "q2", "a2"]
    sg = from_sharegpt([{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}])
    assert sg == [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]
    assert to_messages({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]})[1] == \
        {"role": "assistant", "content": "y"}
    assert to_messages({"prompt": "p", "response": "r"}) == [{"role": "user", "content": "p"},
                                                             {"role": "assistant", "content": "r"}]
    assert check_messages(to_messages({"messages": CONVERSATIONS[0]})) == CONVERSATIONS[0]


def test_bad_records_are_skipped_with_counts_never_truncated(trained_tokenizer):
    tok = trained_tokenizer
    good = {"messages": CONVERSATIONS[1]}
    long_answer = "The quick brown fox jumps over the lazy dog. " * 30
    records = [
        good,
        {"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]},  # missing role
        {"messages": [{"role": "user", "content": "hi"}]},  # no answer at all
        {"instruction": "Say something.", "input": "", "output": "   "},  # empty answer
        {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},  # unknown role
        {"messages": [{"role": "assistant", "content": "answer first"}]},  # no user turn
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"},
                      {"role": "assistant", "content": "a"}]},  # missing assistant between users
        {"instruction": "Tell a story.", "input": "", "output": long_answer},  # longer than the context
        {"foo": "bar"},
        good,
    ]
    examples, report = build_sft(records, tok, max_len=64)
    assert report.kept == 2 and len(examples) == 2
    assert report.skipped == {"missing_role": 3, "no_assistant": 1, "empty_answer": 1, "unknown_role": 1,
                              "too_long": 1, "unknown_format": 1}
    assert report.first["too_long"] == 7
    assert "kept 2 of 10" in report.summary("sft") and "too_long" in report.summary()
    assert all(len(ids) <= 64 for ids, _ in examples)
    ids, labels = tokenize_sft(tok, to_messages(records[7]))  # the long one is whole, not cut, when it fits
    assert len(ids) > 64 and tok.decode(ids).count("lazy dog") == 30
    assert isinstance(SkipReport().summary(), str)


def test_packing_isolates_documents(trained_tokenizer):
    tok = trained_tokenizer
    examples = [tokenize_sft(tok, c) for c in CONVERSATIONS]
    seq_len = sum(len(e[0]) for e in examples) + 5
    rows = pack(examples, seq_len)
    assert len(rows) == 1 and sorted(rows[0]) == [0, 1, 2]
    batch = collate(examples, rows, tok.pad_id, seq_len)
    assert batch["input_ids"].shape == (1, seq_len)
    # positions restart at 0 for each document; the tail is padding (-1)
    starts = (batch["positions"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3 and (batch["positions"][0, -5:] == -1).all()
    mask = batch["attn_mask"][0, 0]
    a, b = starts[0], starts[1]
    assert mask[b, b - 1].item() is False and mask[b - 1, a].item() is True and mask[a, a + 1].item() is False

    torch.manual_seed(0)
    model = Phi3(config_from_name("tiny", vocab_size=tok.vocab_size)).eval()
    model.init_weights(seed=0)
    packed = model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"])
    t = 0
    for i in rows[0]:
        ids = torch.tensor([examples[i][0]])
        alone = model(ids)
        torch.testing.assert_close(packed[:, t:t + ids.shape[1]], alone, rtol=1e-5, atol=1e-5)
        t += ids.shape[1]

    # the same loss with padding instead of packing
    padded = collate(examples, [[i] for i in range(3)], tok.pad_id)
    assert padded["input_ids"].shape == (3, max(len(e[0]) for e in examples))
    pl = model(padded["input_ids"], positions=padded["positions"], attn_mask=padded["attn_mask"])
    loss_pack, n_pack = masked_nll(packed, batch["labels"])
    loss_pad, n_pad = masked_nll(pl, padded["labels"])
    assert n_pack == n_pad == sum(sum(y != IGNORE for y in e[1]) for e in examples)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-4)


def test_cached_render_equals_tokenizer_template(trained_tokenizer):
    from phiforge.train.chat_data import render

    tok = trained_tokenizer
    for conv in CONVERSATIONS:
        for i in range(len(conv) + 1):
            for gen in (False, True):
                assert render(tok, conv[:i], gen) == tok.apply_chat_template(conv[:i], add_generation_prompt=gen)
