"""PPO losses for language models, and the log-probs and entropy they are built from.

Sources:
* Schulman et al. 2017, "Proximal Policy Optimization Algorithms": clipped surrogate
  `max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`, ρ = π / π_behaviour; clipped value loss as in OpenAI baselines.
* Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL": dual clip — for A < 0
  the loss is also capped at −A·c (c > 1), so a huge ratio on a bad action cannot blow up.
* Huang et al., "The N Implementation Details of RLHF with PPO" (TRL) and CleanRL's `ppo.py`:
  token-level masked mean over the batch, `clipfrac` = share of tokens where the clipped term is
  the larger one, approx-KL `(ρ − 1) − log ρ` (http://joschu.net/blog/kl-approx.html, k3 of
  π_behaviour against π), explained variance of the critic.
* Log-probs must come from the distribution that sampled: logits are divided by the sampling
  temperature here as in the sampler (PPO_DETAILS.md, "Sampling and log-probs").

Masked cells are replaced before any exp or square, so padding (even NaN) changes neither the loss
nor its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.critic_free import LossAggregation, aggregate_token_losses
from rlhf_ray.algorithms.kl import KLEstimator, kl_estimate
from rlhf_ray.algorithms.masked import _check_mask, masked_mean, masked_var


def _fill_masked(x: torch.Tensor, m: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.where(m, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at the label tokens: (B, T, V), (B, T) → (B, T), float32.

    The one place the learner turns logits into log-probs (`models.forward.response_logprobs`, the PPO
    update). It is `log_softmax`, as in the sampler that records the behaviour log-probs (and faster
    than logsumexp on CPU). Logits already divided by the temperature pass `temperature=1`, which skips
    the division and its (B, T, V) copy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    scaled = logits.float()  # (B, T, V)
    if temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) → (B, T), float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    scaled = logits.float() / temperature  # (B, T, V)
    probs = F.softmax(scaled, dim=-1)  # (B, T, V)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)  # H = logZ − E_p[logit]


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token entropy over response tokens: (B, T, V), (B, T) → scalar."""
    return masked_mean(entropy_from_logits(logits, temperature), mask)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    behaviour_logp: torch.Tensor | None = None,
    behaviour_weight_cap: float = 2.0,
    clip_eps_high: float | None = None,
    aggregation: LossAggregation = "token-mean",
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate; its per-token terms are aggregated as `aggregation` says (default the
    token-level masked mean over the batch; see `critic_free.aggregate_token_losses`).

    logp (B, T) from the policy being trained; old_logp (B, T) the behaviour log-probs recorded at
    sampling time; advantages (B, T). The ratio is clipped to [1 − clip_eps, 1 + clip_eps_high]
    (`clip_eps_high` None: clip_eps; DAPO's decoupled "clip-higher" lets unlikely tokens with A > 0
    grow further). dual_clip: c > 1 caps the loss at −A·c where A < 0.
    Returns (loss, stats) with detached scalars `clipfrac`, `approxkl`, `ratio_mean`, and
    `dual_clipfrac` when dual_clip is set.

    Off-policy samples (decoupled PPO, Hilton et al. 2022, "Batch size-invariance for policy
    optimization"): when the tokens were sampled by an older policy than the learner's at the start of
    the update, old_logp is that *proximal* policy's (the learner's before the update) and
    behaviour_logp (B, T) the sampler's. The clipping then keeps π near the proximal policy, and each
    token's loss is weighted by π_prox / π_behaviour, truncated at `behaviour_weight_cap` (as V-trace
    truncates its ratios); the mean weight is `behaviour_weight_mean` in the stats.
    """
    m = _check_mask(logp, mask)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    log_ratio = _fill_masked(logp - old_logp, m)  # (B, T), 0 at padding so exp stays finite
    advantages = _fill_masked(advantages, m)
    ratio = torch.exp(log_ratio)  # (B, T) ρ
    pg_losses = -advantages * ratio  # (B, T)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)  # (B, T)
    losses = torch.maximum(pg_losses, pg_losses_clipped)  # (B, T)
    stats = {"clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(logp.dtype), m)}
    if dual_clip is not None:
        # Dual clip: for A < 0, min(max(...), −A·c)
        dual_cap = -advantages * dual_clip  # (B, T)
        dual_clipped = (advantages < 0) & (losses > dual_cap)  # (B, T)
        losses = torch.where(advantages < 0, torch.minimum(losses, dual_cap), losses)
        stats["dual_clipfrac"] = masked_mean(dual_clipped.to(logp.dtype), m)
    if behaviour_logp is not None:
        weights = torch.exp(_fill_masked(old_logp - behaviour_logp, m)).clamp(max=behaviour_weight_cap).detach()
        losses = losses * weights
        stats["behaviour_weight_mean"] = masked_mean(weights, m)
    loss = aggregate_token_losses(losses, m, aggregation, norm_length)
    with torch.no_grad():
        # approx KL http://joschu.net/blog/kl-approx.html
        stats["approxkl"] = masked_mean((ratio - 1) - log_ratio, m)
        stats["ratio_mean"] = masked_mean(ratio, m)
    return loss, {name: value.detach() for name, value in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 · max((v − R)², (clip(v, v_old ± ε) − R)²), masked mean.

    values (B, T) from the critic being trained, old_values (B, T) from the rollout, returns (B, T)
    from GAE. clip_eps=None: plain 0.5 · (v − R)². Returns (loss, {"vf_clipfrac"}), where
    vf_clipfrac is the share of tokens where the clipped term is the larger one.
    """
    m = _check_mask(values, mask)
    values, old_values, returns = (_fill_masked(x, m) for x in (values, old_values, returns))
    vf_losses = (values - returns) ** 2  # (B, T)
    if clip_eps is None:
        loss = 0.5 * masked_mean(vf_losses, m)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=values.dtype, device=values.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), m)
    vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), m)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO, Shao et al. 2024: k3), masked mean over tokens.

    The alternative to the KL penalty in the reward (`kl_penalized_rewards`); use one of the two.
    """
    m = _check_mask(logp, mask)
    return masked_mean(kl_estimate(_fill_masked(logp, m), _fill_masked(ref_logp, m), estimator), m)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − v) / Var(R) over response tokens (CleanRL `explained_var`); NaN if Var(R) = 0.

    1: the critic predicts the returns; 0: no better than their mean; < 0: worse.
    """
    m = _check_mask(values, mask)
    values, returns = _fill_masked(values, m), _fill_masked(returns, m)
    var_returns = masked_var(returns, m, unbiased=False)
    if var_returns == 0:
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    return 1 - masked_var(returns - values, m, unbiased=False) / var_returns
