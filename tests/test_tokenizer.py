"""Tokenizer and chat format: round trips, special tokens, templates against the reference files and transformers."""
import json
import random

import pytest

from conftest import SAMPLE_TEXT, with_bos_post_processor
from phiforge.tokenizer import PHI3_CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, render_chat_template, train_bpe
from phiforge.utils import UserError, shared_dir

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! Can you add 2 + 2?"},
    {"role": "assistant", "content": "Sure: 2 + 2 = 4."},
    {"role": "user", "content": "And now café × 3?\nThanks."},
    {"role": "assistant", "content": "That is not a number, but here: café café café."},
    {"role": "user", "content": "Bye"},
]


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x3FF), range(0x4E00, 0x4E80),
             range(0x1F600, 0x1F650), [0x0A, 0x09, 0x0D, 0x200D, 0xFE0F]]
    return "".join(chr(rng.choice(rng.choice(pools))) for _ in range(n))


def test_bpe_round_trips_arbitrary_utf8(trained_tokenizer):
    rng = random.Random(0)
    for n in (1, 7, 50, 300):
        for _ in range(20):
            text = random_unicode(rng, n)
            assert trained_tokenizer.decode(trained_tokenizer.encode(text)) == text
    assert trained_tokenizer.decode(trained_tokenizer.encode(SAMPLE_TEXT)) == SAMPLE_TEXT


def test_special_tokens_are_reserved_and_never_split(trained_tokenizer):
    tok = trained_tokenizer
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "a<|user|>\nhello<|end|>\n<|assistant|>\nok<|end|><|endoftext|>"
    ids = tok.encode(text)
    for t in ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>"):
        assert tok.token_to_id(t) in ids, t
    assert ids.count(tok.end_id) == 2
    assert tok.decode(ids) == text  # "<|end|>\n<|assistant|>\n" round-trips (no rstrip on our specials)
    assert tok.decode(ids, skip_special_tokens=True) == "a\nhello\n\nok"
    assert tok.stop_ids == {tok.end_id, tok.eos_id}


def test_trained_tokenizer_loads_in_transformers(trained_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    trained_tokenizer.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|system|>\nBe brief.<|end|>\n" + SAMPLE_TEXT
    assert hf.encode(text, add_special_tokens=False) == trained_tokenizer.encode(text) == again.encode(text)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == \
        again.apply_chat_template(CONVERSATION, add_generation_prompt=True)


# tokenizer.json post-processor prepends <s>?, tokenizer_config.json keys -> transformers 5 adds <s>? (with a
# tokenizer.json, from_pretrained drops the config's add_bos_token / add_eos_token: the post-processor decides)
SPECIAL_TOKEN_CASES = {
    "trained (no post-processor)": (False, {}, False),
    "phi3 post-processor, no config key": (True, {}, True),
    "post-processor, config add_bos_token false": (True, {"add_bos_token": False}, True),
    "no post-processor, config add_bos_token and add_eos_token true": (
        False, {"add_bos_token": True, "add_eos_token": True}, False),
}


@pytest.mark.parametrize("case", SPECIAL_TOKEN_CASES)
def test_special_tokens_are_added_as_transformers_adds_them(trained_tokenizer, tmp_path, case):
    """encode(add_special_tokens=True) is `tokenizer(text)` of transformers for the saved folder, before and after
    a save/load round trip, also under from_pretrained(add_bos_token=...) (lm-eval's add_bos_token)."""
    from transformers import AutoTokenizer

    post_processor, config, adds_bos = SPECIAL_TOKEN_CASES[case]
    base = trained_tokenizer
    tok = (with_bos_post_processor(base, **config) if post_processor
           else Tokenizer(base.backend, {**base.config, **config}, {"eos_token_id": sorted(base.stop_ids)}))
    tok.save(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    saved = {k: v for k, v in saved.items() if k not in ("add_bos_token", "add_eos_token")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**saved, **config}))  # the folder is the case's
    text = "Once upon a time<|end|>\n café"
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf(text).input_ids[0] == base.bos_id) == adds_bos == tok.add_bos_token  # the case is what it says
    for mine in (tok, Tokenizer.from_folder(tmp_path)):
        assert mine.encode(text, add_special_tokens=True) == hf(text).input_ids
        assert mine.encode(text) == hf(text, add_special_tokens=False).input_ids
        for flag in (True, False):
            hf_flag = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=flag)
            assert mine.with_add_bos_token(flag).encode(text, add_special_tokens=True) == hf_flag(text).input_ids


def test_sentencepiece_tokenizer_with_added_tokens(tmp_path):
    import json

    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([SAMPLE_TEXT] * 30 + ["The cat sat on the mat. The dog ran away."] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   byte_fallback=True, character_coverage=1.0, model_type="bpe", bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)  # as Llama-2's tokenizer.model
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 400, "<|assistant|>": 401,
                                                            "<|end|>": 402, "<|user|>": 403, "<|system|>": 404}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>",
                                                                "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [400, 401, 402]}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.stop_ids == {400, 401, 402} and tok.end_id == 402 and tok.bos_id == 1
    ids = tok.encode("<|user|>\nThe cat<|end|>\n<|assistant|>\n", add_special_tokens=True)
    assert ids[:2] == [1, 403] and 402 in ids and 401 in ids
    assert tok.decode(ids[1:]) == "<|user|>\nThe cat<|end|>\n<|assistant|>\n"


REFERENCE_TEMPLATES = {
    "Phi-3-mini-4k-instruct/chat_template.may2024-onward.jinja":
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHi! Can you add 2 + 2?<|end|>\n<|assistant|>\n"
        "Sure: 2 + 2 = 4.<|end|>\n<|user|>\nAnd now café × 3?\nThanks.<|end|>\n<|assistant|>\nThat is not a number, "
        "but here: café café café.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n",
    "Phi-3.5-mini-instruct/chat_template.jinja": None,  # same as may2024 for a non-empty system prompt
    "Phi-3-mini-4k-instruct/chat_template.april2024.jinja": None,
    "Phi-3-medium-4k-instruct/chat_template.jinja": None,
    "Phi-4-mini-instruct/chat_template.jinja":
        "<|system|>You are a helpful assistant.<|end|><|user|>Hi! Can you add 2 + 2?<|end|><|assistant|>Sure: 2 + 2 "
        "= 4.<|end|><|user|>And now café × 3?\nThanks.<|end|><|assistant|>That is not a number, but here: café café "
        "café.<|end|><|user|>Bye<|end|><|assistant|>",
}


@pytest.mark.parametrize("name", REFERENCE_TEMPLATES)
def test_reference_templates_render_like_transformers(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    root = shared_dir()
    if root is None or not (root / "reference/phi3" / name).exists():
        pytest.skip("../shared/reference/phi3 is absent: reference chat templates unavailable")
    template = (root / "reference/phi3" / name).read_text()
    ours = render_chat_template(template, CONVERSATION, add_generation_prompt=True, bos_token="<s>",
                                eos_token="<|endoftext|>")
    theirs, _ = render_jinja_template(conversations=[CONVERSATION], chat_template=template,
                                      add_generation_prompt=True, bos_token="<s>", eos_token="<|endoftext|>")
    assert ours == theirs[0]
    if REFERENCE_TEMPLATES[name] is not None:
        assert ours == REFERENCE_TEMPLATES[name]


def test_builtin_template_equals_reference_may2024():
    root = shared_dir()
    if root is None:
        pytest.skip("../shared/reference/phi3 is absent: reference chat templates unavailable")
    ref = (root / "reference/phi3/Phi-3-mini-4k-instruct/chat_template.may2024-onward.jinja").read_text()
    for gen in (True, False):
        kw = dict(add_generation_prompt=gen, bos_token="<s>", eos_token="<|endoftext|>")
        assert render_chat_template(PHI3_CHAT_TEMPLATE, CONVERSATION[:3], **kw) == \
            render_chat_template(ref, CONVERSATION[:3], **kw)


def test_template_sandbox_blocks_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):
        render_chat_template(evil, CONVERSATION)
    with pytest.raises(UserError, match="chat template failed"):
        render_chat_template("{{ raise_exception('no tools') }}", CONVERSATION)


def test_bad_messages_are_refused(trained_tokenizer):
    with pytest.raises(UserError, match="message 1"):
        trained_tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"content": "no role"}])


def test_tokenizer_cli_trains_and_saves(tmp_path):
    from phiforge.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT * 20)
    assert main(["tokenizer", "--files", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_folder(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.decode(tok.encode(SAMPLE_TEXT)) == SAMPLE_TEXT
    assert main(["tokenizer", "--files", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t2")]) == 2
