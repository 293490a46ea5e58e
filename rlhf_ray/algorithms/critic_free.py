"""The critic-free family beyond GRPO and RLOO: the pieces Dr.GRPO, DAPO, GSPO and REINFORCE++ add.

* Loss aggregation (`aggregate_token_losses`, veRL's names): how per-token losses become one number.
  `token-mean` weighs every token alike (long responses count more); `seq-mean-token-mean` weighs every
  sequence alike (GRPO's paper: a token of a short response counts more); `seq-mean-token-sum` sums each
  sequence's tokens, and `seq-mean-token-sum-norm` divides that sum by one constant instead of each
  sequence's length (Dr.GRPO, Liu et al. 2025: no length bias).
* DAPO (Yu et al. 2025): a decoupled clip range (`clip_eps_high` of `losses.policy_loss`), groups whose
  rewards are all equal carry no signal (`informative_groups`, for dynamic sampling), and a soft penalty
  for responses that run into the token budget (`overlong_penalty`).
* GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its token ratios,
  clipped per sequence (`gspo_policy_loss`).
* REINFORCE++ (Hu 2025): each token's return is the sum of the (KL-penalised) rewards from it to the end,
  normalised over the whole batch (`reinforce_pp_advantages`), no critic and no groups.

Tensors are per response token, (B, T), with a response mask (B, T), as in the rest of the package.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf_ray.algorithms.masked import SumReduce, _check_mask, masked_whiten

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def aggregate_token_losses(losses: torch.Tensor, mask: torch.Tensor, mode: LossAggregation = "token-mean",
                           norm_length: int | None = None) -> torch.Tensor:
    """One loss from per-token losses (B, T). `norm_length`: the constant of `seq-mean-token-sum-norm`
    (Dr.GRPO uses the generation budget, the same for every sequence and every batch)."""
    m = _check_mask(losses, mask)
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    per_token = torch.where(m, losses, zero)  # (B, T)
    if mode == "token-mean":
        return per_token.sum() / m.sum().clamp(min=1)
    sums = per_token.sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        per_sequence = sums / m.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_sequence = sums
    elif mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs norm_length >= 1, got {norm_length}")
        per_sequence = sums / norm_length
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LossAggregation.__args__}")
    return per_sequence.mean()


def informative_groups(scores: torch.Tensor, group_size: int, atol: float = 0.0) -> torch.Tensor:
    """Which groups of `group_size` consecutive sequences have rewards that are not all equal (G,) bool:
    only those give a group baseline any signal (DAPO's dynamic sampling keeps them)."""
    if scores.dim() != 1 or group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"expected scores (B,) with B a multiple of group_size >= 2, got {tuple(scores.shape)} "
                         f"and {group_size}")
    groups = scores.view(-1, group_size)  # (G, K)
    return (groups.amax(-1) - groups.amin(-1)) > atol


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (B,): 0 up to `max_new_tokens - buffer` tokens, then falling linearly
    to `-factor` at `max_new_tokens` (and beyond)."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"buffer must be in (0, max_new_tokens={max_new_tokens}], got {buffer}")
    over = (lengths.to(torch.float32) - (max_new_tokens - buffer)).clamp(min=0, max=buffer)  # (B,)
    return -factor * over / buffer


def gspo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: s_i = exp(mean_t(logp - old_logp)) per sequence, loss = mean_i -min(s_i A_i, clip(s_i) A_i).

    logp, old_logp (B, T); advantages (B,) one per sequence (a group baseline's). The default clip range is
    the paper's: sequence ratios stay far closer to 1 than token ratios. Returns (loss, stats) with the
    fraction of sequences clipped, the mean sequence ratio and the token-level approximate KL."""
    m = _check_mask(logp, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(m, logp - old_logp, zero).sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
    ratio = torch.exp(log_ratio)  # (B,)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped).mean()
    token_log_ratio = torch.where(m, logp - old_logp, zero)
    stats = {"clipfrac": (clipped > unclipped).to(logp.dtype).mean(), "ratio_mean": ratio.mean(),
             # the token-level approximate KL (http://joschu.net/blog/kl-approx.html), as PPO's loss reports
             "approxkl": (torch.where(m, token_log_ratio.exp() - 1 - token_log_ratio, zero).sum()
                          / m.sum().clamp(min=1))}
    return loss, {name: value.detach() for name, value in stats.items()}


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor,
                            reduce: SumReduce | None = None) -> torch.Tensor:
    """REINFORCE++: return-to-go G_t = sum_{s >= t} r_s (no discount) of the per-token rewards (B, T)
    (the KL penalty on every token, the score on the last), whitened over the whole batch (`reduce`: the
    all-reduce hook for statistics over ranks)."""
    m = _check_mask(token_rewards, mask)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(m, token_rewards, zero)
    returns = rewards.flip(-1).cumsum(-1).flip(-1)  # (B, T)
    return masked_whiten(returns, m, reduce=reduce)


__all__ = ["LossAggregation", "aggregate_token_losses", "gspo_policy_loss", "informative_groups", "overlong_penalty",
           "reinforce_pp_advantages"]
