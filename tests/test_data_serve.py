"""Synthesis through `phiforge serve` itself (a tiny random model) as the teacher: the data stage and the server speak
the same OpenAI protocol end to end. Fault injection (429/500/timeouts) is covered against tests/openai_stub.py."""
import json
import os

from phiforge.checkpoint import build_model
from phiforge.data import synth
from phiforge.data.io import read_jsonl
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3Config
from phiforge.serve import start_background


def test_synth_against_phiforge_serve(tmp_path, trained_tokenizer):
    tok = trained_tokenizer
    cfg = config_from_name("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                                               max_position_embeddings=4096, original_max_position_embeddings=4096)
    model = build_model(cfg).eval()
    os.environ["PHIFORGE_NO_PROGRESS"] = "1"
    url, stop = start_background((model, tok), model_id="teacher", max_batch=4)
    try:
        out = tmp_path / "stories"
        args = ["--recipe", "tinystories", "--n", "6", "--out", str(out), "--shard-size", "3", "--seed", "1",
                "--base-url", url + "/v1", "--model", "teacher", "--max-tokens", "12", "--temperature", "0",
                "--min-words", "1", "--concurrency", "3"]
        assert synth.main(args) == 0
        stats = json.loads((out / "stats.json").read_text())
        docs = [d for f in sorted(out.glob("*.jsonl.gz")) for d in read_jsonl(f)]
        assert stats["docs_in"] == 6 and len(docs) == stats["docs_out"] >= 1
        assert all(d["text"] and "<|end|>" not in d["text"] for d in docs)
        # greedy and cached: a rerun asks nothing and changes nothing
        before = sorted(p.read_bytes() for p in out.glob("*.jsonl.gz"))
        assert synth.main(args) == 0
        assert sorted(p.read_bytes() for p in out.glob("*.jsonl.gz")) == before
    finally:
        stop()
