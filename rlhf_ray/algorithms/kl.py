"""KL between the policy and the frozen reference: per-token estimators, the KL-penalised reward,
and the controllers of the KL coefficient β.

Sources:
* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", and their
  `lm-human-preferences` code (`train_policy.py`): reward `r_t = -β · (log π − log π_ref)` on every
  response token, plus the reward model's score on the last one; adaptive β (`AdaptiveKLController`).
* Huang et al., "The N Implementation Details of RLHF with PPO": the same, as TRL implements it.
* J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html: with
  `r = π_ref / π` at a token sampled from π, k1 = −log r (unbiased, can be negative),
  k2 = ½ (log r)² (biased, low variance), k3 = (r − 1) − log r (unbiased, always ≥ 0). GRPO
  (Shao et al. 2024, DeepSeekMath) puts a k3 term in the loss instead of in the reward.

All per-token tensors are (B, T) over response tokens with a response mask (B, T).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf_ray.algorithms.masked import _check_mask

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref, per token. Unbiased; single tokens can be negative."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)², per token. Biased, low variance, ≥ 0."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1, per token. Unbiased, ≥ 0 (joschu.net/blog/kl-approx)."""
    log_r = ref_logp - logp  # log(π_ref / π)
    return torch.exp(log_r) - log_r - 1


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """The per-token KL estimate named by `estimator` ("k1", "k2" or "k3")."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[estimator](logp, ref_logp)


def place_sequence_reward(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's score (B,) on its last response token (the EOS when there is one).

    Returns (B, T): zero everywhere except at the last cell of each row where mask is 1.
    """
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(
            f"place_sequence_reward: expected scores (B,) and mask (B, T), "
            f"got scores {tuple(scores.shape)} and mask {tuple(mask.shape)}"
        )
    m = mask.bool()
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"place_sequence_reward: rows {empty} have no response token to put the score on")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, positions, -1).max(dim=1).values  # (B,) index of the last response token
    rewards = torch.zeros(m.shape, dtype=scores.dtype, device=scores.device)  # (B, T)
    rewards[torch.arange(m.shape[0], device=m.device), last] = scores
    return rewards


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF reward `r_t = −β · KL_t`, plus the sequence score at the last response token.

    scores (B,), logp / ref_logp (B, T) log-probs of the sampled tokens under the behaviour policy
    and the reference, mask (B, T). Returns (rewards, kl), both (B, T) and 0 at masked cells.
    Ziegler et al. 2019 use k1.
    """
    m = _check_mask(logp, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = torch.where(m, kl_estimate(logp, ref_logp, estimator), zero)  # (B, T)
    rewards = -kl_coef * kl + place_sequence_reward(scores.to(logp.dtype), m)  # (B, T)
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient β."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """β stays as it is; returns it."""
        return self.value

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"{type(self).__name__}: state is for a {state.get('kind')!r} controller")
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """β that steers the observed KL towards a target (Ziegler et al. 2019, `AdaptiveKLController`).

    `update(current_kl, n_steps)`: e = clip(KL / target − 1, −0.2, 0.2), β ← β · (1 + e · n_steps / horizon).
    current_kl is the mean over sequences of the summed per-token KL (nats per response), n_steps
    the number of episodes in the batch just used. lm-human-preferences: β₀ 0.15, target 6, horizon 10000.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """One proportional-control step; returns the new β."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
