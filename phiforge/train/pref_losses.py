"""Preference losses as small pure functions in the papers' notation (their inputs, summed sequence log-probs, come from
phiforge.scoring.sequence_logps).

Notation: for a prompt x with preferred answer y_w and dispreferred y_l, the policy pi_theta and the frozen reference
pi_ref, the implicit reward is  r(x, y) = beta * log(pi_theta(y|x) / pi_ref(y|x)).  Every loss takes the four summed
(or, for IPO, length-averaged) log-probabilities as (B,) tensors and returns per-pair losses (B,); callers take the
mean. Numerics checked against TRL 1.16 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) in
tests/test_dpo_losses.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(pi_logp_w: torch.Tensor, pi_logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7):

        L = -log sigma( beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)] )
    """
    h = (pi_logp_w - ref_logp_w) - (pi_logp_l - ref_logp_l)
    return -F.logsigmoid(beta * h)


def cdpo_loss(pi_logp_w: torch.Tensor, pi_logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
              beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the preference label is flipped with
    probability eps, so the target is a smoothed Bernoulli:

        L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h),   h as in `dpo_loss`.

    eps = 0 is plain DPO. (TRL 1.16 has no standalone cDPO type; its "aot" loss reduces to this form for one pair.)"""
    h = (pi_logp_w - ref_logp_w) - (pi_logp_l - ref_logp_l)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pi_logp_w: torch.Tensor, pi_logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17),
    with tau = beta:

        L = ( h - 1 / (2 * tau) )^2,   h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x).

    Deviation, as in TRL and confirmed there with the IPO authors:
      1. the log-probabilities passed in are averaged per completion token (sum / number of tokens), so that the
         squared loss does not scale with answer length."""
    h = (pi_logp_w - ref_logp_w) - (pi_logp_l - ref_logp_l)
    return (h - 1 / (2 * beta)) ** 2


def preference_metrics(pi_logp_w: torch.Tensor, pi_logp_l: torch.Tensor, ref_logp_w: torch.Tensor,
                       ref_logp_l: torch.Tensor, beta: float) -> dict[str, float]:
    """Implicit rewards r = beta * (log pi - log pi_ref) on summed log-probs: means of the chosen and rejected rewards,
    reward accuracy (fraction with r_w > r_l) and margin (mean r_w - r_l), as TRL logs them."""
    r_w = beta * (pi_logp_w - ref_logp_w).detach()
    r_l = beta * (pi_logp_l - ref_logp_l).detach()
    return {"rewards/chosen": r_w.mean().item(), "rewards/rejected": r_l.mean().item(),
            "rewards/accuracies": (r_w > r_l).float().mean().item(), "rewards/margins": (r_w - r_l).mean().item()}
