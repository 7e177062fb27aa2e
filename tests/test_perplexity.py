"""Strided-window perplexity against a direct computation, KL against a reference, and the quantization quality
table on ../shared data (skipped when absent)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phiforge import quant
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3, Phi3Config
from phiforge.data.io import read_text
from phiforge.perplexity import evaluate, main
from phiforge.utils import UserError, shared_dir


def _model(seed=0):
    torch.manual_seed(seed)
    m = Phi3(config_from_name("tiny"))
    m.init_weights(seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return m.eval()


def test_single_window_equals_cross_entropy_and_strides_score_each_token_once():
    model = _model()
    ids = torch.randint(0, 512, (40,)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    ce = F.cross_entropy(logits, torch.tensor(ids[1:]))
    res = evaluate(model, ids, ctx=64, stride=64)
    assert res["tokens"] == 39 and res["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    strided = evaluate(model, ids, ctx=16, stride=5)
    assert strided["tokens"] == 39  # every target once, whatever the stride
    # a window's later tokens keep the context they had in the full pass only when ctx covers everything
    assert strided["ppl"] != pytest.approx(res["ppl"], rel=1e-9)
    with pytest.raises(UserError, match="stride"):
        evaluate(model, ids, ctx=16, stride=32)


def test_kl_is_zero_against_itself_and_positive_after_quantization():
    ref, model = _model(1), _model(1)
    ids = torch.randint(0, 512, (60,)).tolist()
    same = evaluate(model, ids, 32, 16, reference=ref)
    assert abs(same["kl"]) < 1e-6 and same["top1_agree"] == 1.0
    quant.quantize(model, bits=4, group_size=32)
    q = evaluate(model, ids, 32, 16, reference=ref)
    assert q["kl"] > 1e-6 and q["ppl"] != same["ppl"]


def test_gptq_is_no_worse_than_rtn_in_kl():
    """Calibrate on one half of a token stream, measure on the other (same distribution)."""
    torch.manual_seed(0)
    ref = _model(3)
    # data the model itself finds likely: sample from it, so calibration inputs resemble the evaluated ones
    with torch.no_grad():
        ids = torch.randint(0, 512, (24, 1))
        for _ in range(63):
            probs = torch.softmax(ref(ids)[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
    calib, held = ids[:16], ids[16:].reshape(-1).tolist()
    kl = {}
    for method in ("rtn", "gptq"):
        m = _model(3)
        quant.quantize(m, bits=4, group_size=32, method=method, calib=calib)
        kl[method] = evaluate(m, held, 64, 64, reference=ref)["kl"]
    assert kl["gptq"] <= kl["rtn"], kl


def test_cli_reports_perplexity_and_kl(tmp_path, trained_tokenizer, capsys):
    from phiforge.checkpoint import save_hf_folder
    from tests.conftest import SAMPLE_TEXT

    save_hf_folder(_model(), tmp_path / "m", tokenizer=trained_tokenizer)
    (tmp_path / "d.txt").write_text(SAMPLE_TEXT * 4)
    rc = main([str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"), "--reference", str(tmp_path / "m"),
               "--ctx", "32", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "KL" in out and (tmp_path / "r.json").exists()
    with pytest.raises(UserError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))


@pytest.mark.slow
@pytest.mark.needs_shared
def test_quality_table_on_wikitext():
    """The acceptance table: fp32 / int8 / int4-RTN / int4-GPTQ on ../shared/data/wikitext with a model phiforge
    trained (PHIFORGE_PPL_MODEL or runs/*/final). Skips when either is missing."""
    import os
    from pathlib import Path

    shared = shared_dir()
    if shared is None or not (shared / "data" / "wikitext").exists():
        pytest.skip("../shared/data/wikitext is not present")
    folder = os.environ.get("PHIFORGE_PPL_MODEL")
    if not folder:
        found = sorted(p.parent for p in Path(__file__).resolve().parent.parent.glob("runs/**/final/config.json"))
        if not found:
            pytest.skip("no trained phiforge model (set PHIFORGE_PPL_MODEL)")
        folder = str(found[0])
    from phiforge import load

    ref, tok = load(folder)
    ids = tok.encode(read_text(str(shared / "data" / "wikitext"))[:200_000])[:8192]  # ~8k tokens is plenty
    calib = torch.tensor(ids[:4096]).reshape(-1, 256)
    held = ids[4096:]
    rows = {"fp32": evaluate(ref, held, 256, 128, reference=ref)}
    for name, kw in {"int8": dict(bits=8), "int4-rtn": dict(bits=4, group_size=32),
                     "int4-gptq": dict(bits=4, group_size=32, method="gptq", calib=calib)}.items():
        m, _ = load(folder)
        rows[name] = evaluate(quant.quantize(m, **kw), held, 256, 128, reference=ref)
    for name, r in rows.items():
        print(f"{name:10s} ppl {r['ppl']:.4f}  KL {r['kl']:.5f}")
    assert rows["int4-gptq"]["kl"] <= rows["int4-rtn"]["kl"]


def test_documents_rolling_bits_per_byte_equal_the_rule_computed_directly(tmp_path, capsys):
    """The TinyStories held-out rule (issue 35), computed here from its wording with a plain forward pass:
    stream `EOS s1 EOS ... sN EOS` of the last N stories (each encoded alone, no special tokens), mean NLL of every
    token after the first over non-overlapping ctx-token windows with no carried context, bits per byte =
    nats / ln 2 / (UTF-8 bytes of the N stories + N)."""
    import gzip
    import json

    from phiforge.checkpoint import save_hf_folder
    from phiforge.tokenizer import train_bpe

    stories = [f"Story {i}: Tom and Sue went to the park {'and played ' * (i % 7)}with a red ball. It was fun! é"
               for i in range(30)]
    tok = train_bpe(stories, vocab_size=300)
    model = _model(5)
    save_hf_folder(model, tmp_path / "m", tokenizer=tok)
    data = tmp_path / "stories.txt.gz"
    with gzip.open(data, "wt") as f:  # the TinyStories file layout: a "<|endoftext|>" line between stories
        f.write("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    last, ctx = 12, 16
    held = stories[-last:]
    stream = [tok.eos_id]
    for s in held:
        stream += tok.encode(s) + [tok.eos_id]
    assert tok.bos_id is None or stream.count(tok.bos_id) == 0
    nats, scored = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, ctx):  # window: inputs stream[start:start+ctx], targets one later
            x = torch.tensor(stream[start:start + ctx][:len(stream) - 1 - start])
            y = torch.tensor(stream[start + 1:start + 1 + len(x)])
            nats += float(F.cross_entropy(model(x[None])[0], y, reduction="sum"))
            scored += len(y)
    assert scored == len(stream) - 1 and len(stream) % ctx != 1  # a partial last window is exercised
    expected = nats / math.log(2) / (sum(len(s.encode()) for s in held) + last)
    rc = main([str(tmp_path / "m"), "--data", str(data), "--docs", "eot", "--last-docs", str(last), "--rolling",
               "--ctx", str(ctx), "--json", str(tmp_path / "r.json")])
    assert rc == 0 and f"{expected:.4f} bits per byte" in capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["bits_per_byte"] == pytest.approx(expected, rel=1e-6) and res["tokens"] == scored
    with pytest.raises(UserError, match="holds only 30 documents"):
        main([str(tmp_path / "m"), "--data", str(data), "--docs", "eot", "--last-docs", "31", "--rolling"])
    with pytest.raises(UserError, match="--last-docs needs --docs"):
        main([str(tmp_path / "m"), "--data", str(data), "--last-docs", "3"])
    # argument mistakes are caught before any model is loaded (the model path here does not exist)
    (tmp_path / "afile").write_text("x")
    for bad, message in ((["--rolling", "--reference", "r"], "drop --rolling"),
                         (["--json", str(tmp_path / "afile" / "r.json")], "afile is a file")):
        with pytest.raises(UserError, match=message):
            main([str(tmp_path / "missing-model"), "--data", str(data), *bad])


def test_cli_on_a_bos_tokenizer_equals_transformers_over_the_same_windows(tmp_path, trained_tokenizer, capsys):
    """A tokenizer whose tokenizer.json prepends <s> (as Phi-3's): `phiforge perplexity` scores transformers'
    `tokenizer(text)`, <s> first, and each window's new tokens as a transformers forward of that window does."""
    import json

    from transformers import AutoTokenizer

    from tests.conftest import SAMPLE_TEXT, hf_model, with_bos_post_processor

    tok = with_bos_post_processor(trained_tokenizer)
    ref = hf_model(config_from_name("tiny", vocab_size=tok.vocab_size))  # no sliding window
    ref.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    (tmp_path / "d.txt").write_text(SAMPLE_TEXT * 2)
    ctx, stride = 32, 16
    assert main([str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"), "--ctx", str(ctx), "--stride", str(stride),
                 "--json", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    ids = AutoTokenizer.from_pretrained(tmp_path / "m")(SAMPLE_TEXT * 2).input_ids
    assert ids[0] == tok.bos_id
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):  # the windows of the module docstring
        end = min(begin + ctx, len(ids))
        with torch.no_grad():
            logp = F.log_softmax(ref(torch.tensor([ids[begin:end]])).logits[0].float(), -1)
        for t in range(max(prev_end, begin + 1), end):  # targets no earlier window scored
            nll -= float(logp[t - begin - 1, ids[t]])
            n += 1
        prev_end = end
        if end == len(ids):
            break
    assert got["tokens"] == n == len(ids) - 1
    assert got["nll"] == pytest.approx(nll / n, abs=1e-5)
