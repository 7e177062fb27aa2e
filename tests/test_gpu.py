"""CUDA paths (skipped without a GPU; run on the lent GPU machine): parity with transformers and cache exactness on
the device, in fp32 and bf16."""
import pytest
import torch

from conftest import hf_model
from phiforge.checkpoint import build_model
from phiforge.models import config_from_name
from phiforge.models.phi3 import Phi3Config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("preset", ["tiny-4k", "tiny-128k", "tiny-gqa", "tiny-phi4"])
def test_cuda_logits_match_transformers(preset):
    cfg = config_from_name(preset)
    ref = hf_model(cfg).cuda()
    ours = build_model(cfg, init=False).cuda()
    ours.load_state_dict(ref.state_dict(), strict=False)
    if cfg.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 50), device="cuda")
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        err = (ours(ids) - ref(ids).logits).abs().max().item()
        assert err <= 1e-4, err
        ref16, ours16 = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        a, b = ours16(ids).float(), ref16(ids).logits.float()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
        assert (a - b).abs().max().item() < 0.25


def test_cuda_cached_decode_equals_full_forward():
    cfg = config_from_name("tiny-4k")
    model = build_model(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 64)
        outs = [model(ids[:, :10], positions=torch.arange(10, device="cuda"), cache=cache,
                      cache_slots=torch.arange(10, device="cuda"))]
        for t in range(10, 40):
            pos = torch.tensor([t], device="cuda")
            outs.append(model(ids[:, t:t + 1], positions=pos, cache=cache, cache_slots=pos))
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4
