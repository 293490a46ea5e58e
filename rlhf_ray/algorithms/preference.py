"""Losses on preference pairs: a prompt, a chosen and a rejected response, no reward model and no sampling.

Each loss reads the log-probability of each whole response, summed over its response tokens
(`sequence_logps`; prompt and padding tokens are masked out), under the policy and, where the method has
one, under the frozen reference. With h the difference of the two log-ratios,

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)),

* DPO (Rafailov et al. 2023): -log sigmoid(beta h). Conservative DPO (cDPO, Mitchell 2023) assumes a share
  `label_smoothing` of the labels is flipped: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
* IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, a squared loss that stops pushing once the margin is reached;
  its log-probabilities are averaged over each response's tokens (`sequence_logps(average=True)`), as the
  paper's implementation does.
* SimPO (Meng et al. 2024): no reference; -log sigmoid(beta (a_w - a_l) - gamma), with a_w, a_l the
  length-averaged log-probabilities and gamma a target margin.

* RPO (Pang et al. 2024): any of them plus `alpha` times the chosen response's negative log-likelihood per
  token (`with_chosen_nll`). DPO alone can lower the chosen responses' likelihood too, as long as the
  rejected ones fall faster; the NLL term holds the chosen ones up.

The implicit rewards, beta times a response's log-ratio (DPO, IPO) or its average log-probability (SimPO),
give the field's metrics: rewards/chosen, rewards/rejected, rewards/accuracies (chosen above rejected),
rewards/margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.masked import _check_mask

PreferenceLossType = Literal["dpo", "ipo", "simpo"]


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B,) the log-probability of each response: its tokens' (B, T) log-probs summed over the response
    mask, or averaged over its response tokens with `average` (IPO, SimPO). An empty response is an error."""
    m = _check_mask(token_logps, mask)
    lengths = m.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"responses {torch.nonzero(lengths == 0).flatten().tolist()} have no response tokens")
    sums = torch.where(m, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)).sum(-1)
    return sums / lengths if average else sums


@dataclass(frozen=True)
class PreferenceLoss:
    """Per pair (B,): the loss, and the implicit rewards of the chosen and the rejected response."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The batch means under the field's names (TRL, OpenRLHF)."""
        chosen, rejected = self.chosen_rewards.detach().float(), self.rejected_rewards.detach().float()
        return {"loss": float(self.losses.detach().float().mean()), "rewards/chosen": float(chosen.mean()),
                "rewards/rejected": float(rejected.mean()),
                "rewards/accuracies": float((chosen > rejected).float().mean()),
                "rewards/margins": float((chosen - rejected).mean())}


def _check_pairs(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected log-probs of shape (B,) for every side of the pairs, got {sorted(shapes)}")


def _check_settings(beta: float, label_smoothing: float = 0.0) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the logistic loss with a share e of the labels flipped."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO on summed log-probs (B,); `label_smoothing` > 0 is conservative DPO."""
    _check_pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    _check_settings(beta, label_smoothing)
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return PreferenceLoss(_sigmoid_loss(chosen - rejected, label_smoothing), chosen.detach(), rejected.detach())


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> PreferenceLoss:
    """IPO on length-averaged log-probs (B,): the log-ratio margin regressed onto 1 / (2 beta)."""
    _check_pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    _check_settings(beta)
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO on length-averaged log-probs (B,), reference-free, with target margin `gamma`."""
    _check_pairs(policy_chosen, policy_rejected)
    _check_settings(beta, label_smoothing)
    chosen, rejected = beta * policy_chosen, beta * policy_rejected
    return PreferenceLoss(_sigmoid_loss(chosen - rejected - gamma, label_smoothing), chosen.detach(),
                          rejected.detach())


def with_chosen_nll(loss: PreferenceLoss, policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor,
                    alpha: float, averaged: bool) -> PreferenceLoss:
    """`loss` plus `alpha` times each chosen response's negative log-likelihood per token (RPO). The chosen
    log-probs (B,) are summed over `chosen_lengths` tokens, or already `averaged` over them."""
    _check_pairs(loss.losses, policy_chosen, chosen_lengths)
    if alpha < 0:
        raise ValueError(f"the chosen-NLL weight must be >= 0, got {alpha}")
    if alpha == 0:
        return loss
    per_token = policy_chosen if averaged else policy_chosen / chosen_lengths.to(policy_chosen.dtype)
    return PreferenceLoss(loss.losses - alpha * per_token, loss.chosen_rewards, loss.rejected_rewards)


def averages_log_probs(loss_type: PreferenceLossType) -> bool:
    """Whether the method reads length-averaged (IPO, SimPO) rather than summed (DPO) response log-probs."""
    return loss_type in ("ipo", "simpo")
