"""DPO / IPO / cDPO losses and reward metrics equal TRL 1.16's `DPOTrainer._compute_loss` on identical
log-probabilities (to 1e-6). TRL's method is called unbound on a minimal stand-in for the trainer and a stand-in
model whose per-token log-probs we choose, with precomputed reference log-probs; nothing is re-implemented here."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from phiforge.train.pref_losses import cdpo_loss, dpo_loss, ipo_loss, preference_metrics

B, T = 6, 9


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    # completion masks of different lengths (prompt first, then completion, then padding)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for b in range(2 * B):
        start, stop = 1 + b % 3, T - (b % 4)
        mask[b, start:stop] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 10 - 5
    return mask, per_token, ref


def trl_loss(loss_type, beta, label_smoothing=0.0, seed=0):
    pytest.importorskip("trl")
    from trl import DPOTrainer

    mask, per_token, ref = make_inputs(seed)
    fake_model = lambda **kw: SimpleNamespace(  # noqa: E731  (what TRL reads off the fused-LM-head output)
        log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    accel = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = DPOTrainer._compute_loss(trainer, fake_model, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return loss, metrics, mask, per_token, ref


def ours(mask, per_token, ref):
    logps = per_token.sum(1)
    return logps[:B], logps[B:], ref[:B], ref[B:]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_loss_and_metrics_equal_trl(beta):
    loss, metrics, mask, per_token, ref = trl_loss("sigmoid", beta)
    args = ours(mask, per_token, ref)
    assert abs(dpo_loss(*args, beta=beta).mean().item() - loss.item()) < 1e-6
    mine = preference_metrics(*args, beta=beta)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(mine[key] - metrics[key]) < 1e-6, key
    assert 0 < mine["rewards/accuracies"] < 1  # the fixture exercises both outcomes


def test_ipo_loss_equals_trl():
    beta = 0.2
    loss, metrics, mask, per_token, ref = trl_loss("ipo", beta, seed=1)
    n = mask.sum(1).clamp(min=1).double()  # IPO uses per-token averaged log-probs (see ipo_loss docstring)
    logps = per_token.sum(1) / n
    ref_avg = ref / n
    mine = ipo_loss(logps[:B], logps[B:], ref_avg[:B], ref_avg[B:], beta=beta).mean()
    assert abs(mine.item() - loss.item()) < 1e-6
    assert abs(preference_metrics(*ours(mask, per_token, ref), beta=beta)["rewards/margins"]
               - metrics["rewards/margins"]) < 1e-6


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_loss_equals_trl(eps):
    """TRL 1.16 folds label smoothing into "aot" (sorted log-ratios): with one pair sorting is the identity and it is
    exactly conservative DPO; eps = 0 must also equal TRL's sigmoid loss."""
    beta = 0.3
    mask, per_token, ref = make_inputs(2)
    args = ours(mask, per_token, ref)
    mine = cdpo_loss(*args, beta=beta, label_smoothing=eps)
    for b in range(B):
        pytest.importorskip("trl")
        from trl import DPOTrainer

        rows = [b, B + b]
        fake_model = lambda **kw: SimpleNamespace(  # noqa: E731
            log_probs=per_token[rows], entropy=torch.zeros(2, T - 1), mean_logits=torch.zeros(2, T - 1),
            is_top1=torch.zeros(2, T - 1, dtype=torch.bool))
        trainer = SimpleNamespace(
            model=SimpleNamespace(training=False), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x,
                                                                             gather_for_metrics=lambda x: x),
            aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
            loss_types=["aot"], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
        inputs = {"input_ids": torch.zeros(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T),
                  "completion_mask": mask[rows], "ref_chosen_logps": ref[b:b + 1],
                  "ref_rejected_logps": ref[B + b:B + b + 1]}
        assert abs(mine[b].item() - DPOTrainer._compute_loss(trainer, fake_model, inputs, False).item()) < 1e-6
    loss0, *_ = trl_loss("sigmoid", beta, seed=2)
    assert abs(cdpo_loss(*args, beta=beta, label_smoothing=0.0).mean().item() - loss0.item()) < 1e-6
    if eps > 0:
        assert not torch.allclose(mine, dpo_loss(*args, beta=beta))


def test_dpo_gradient_pushes_chosen_up():
    pw, pl = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pw, pl, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1).sum().backward()
    assert pw.grad.item() < 0 < pl.grad.item()
