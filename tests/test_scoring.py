"""phiforge.scoring, the one log-prob primitive: DPO's sequence log-probs (with autograd) and chunked head scoring
agree with the plain full-logits computation. Eval, perplexity and the server's echo are tested through their own
modules (test_eval_harness.py, test_perplexity.py, test_serve.py); loglikelihood in test_generate.py."""
from __future__ import annotations

import torch

from phiforge import load
from phiforge.scoring import score_hidden, score_logits, sequence_logps


def _padded_pairs(vocab: int):
    """Two right-padded sequences (positions -1 on padding) with a completion mask, as DPO's collate builds them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    positions = torch.arange(12).repeat(2, 1)
    positions[1, 9:] = -1
    ids[1, 9:] = 0
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, 4:9] = True
    return ids, positions, mask


def test_sequence_logps_equal_full_logits_and_keep_autograd():
    model, _ = load("tiny-gqa", seed=2)
    ids, positions, mask = _padded_pairs(model.config.vocab_size)
    logits = model(ids, positions=positions)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    want, want_n = (logp * m).sum(-1), m.sum(-1)
    got, n = sequence_logps(model, ids, mask, positions=positions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(n, want_n)
    got.sum().backward()
    assert model.head.weight.grad is not None and model.embed.weight.grad is not None


@torch.no_grad()
def test_chunked_head_scoring_equals_one_block():
    model, _ = load("tiny", seed=1)
    hidden = model(torch.randint(3, model.config.vocab_size, (1, 37)), return_hidden=True)[0]
    targets = torch.randint(3, model.config.vocab_size, (37,))
    whole = score_logits(model.head(hidden), targets, top=3)
    chunked = score_hidden(model, hidden, targets, top=3, chunk=8)
    torch.testing.assert_close(chunked.logprob, whole.logprob)
    assert torch.equal(chunked.greedy, whole.greedy) and torch.equal(chunked.top_ids, whole.top_ids)
    assert whole.top_logprobs[:, 0].ge(whole.logprob - 1e-6).all()  # the best alternative is at least the target
