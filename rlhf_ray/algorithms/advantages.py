"""Advantage estimators: GAE with a critic, and the critic-free GRPO and RLOO baselines.

Sources:
* Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation": δ_t = r_t + γ V(s_{t+1}) − V(s_t), A_t = δ_t + γ λ A_{t+1}.
  In RLHF the episode is the response: GAE runs over response tokens only, and the value after
  the last one is 0 (Ziegler et al. 2019; Huang et al., "The N Implementation Details of RLHF
  with PPO"). Masked cells are skipped (their reward, value and δ are ignored; what follows them is
  carried across), as veRL's `compute_gae_advantage_return` does for tokens that are not the policy's.
* GRPO, Shao et al. 2024 (DeepSeekMath): A_i = (r_i − mean(r_group)) / (std(r_group) + eps) for the
  G responses sampled for one prompt. std is the unbiased (n − 1) sample std, as `torch.std` in
  veRL's `compute_grpo_outcome_advantage` and TRL's `GRPOTrainer`. `scale_by_std=False` leaves
  the division out (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO).
* RLOO, Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization"):
  A_i = r_i − mean_{j≠i} r_j, the leave-one-out baseline.

Groups are given either by `group_size` (the batch is consecutive groups of that size, prompt by
prompt) or by `group_ids` (B,) (any labels; equal labels form a group).
"""

from __future__ import annotations

import torch

from rlhf_ray.algorithms.masked import _check_mask


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), 0 at masked cells;
    returns = advantages + values (the critic's regression target).
    """
    m = _check_mask(values, mask)
    _check_mask(rewards, mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(m, rewards, zero)
    values = torch.where(m, values, zero)
    batch_size, length = values.shape
    next_value = torch.zeros(batch_size, dtype=values.dtype, device=values.device)  # (B,) V after the last token: 0
    next_advantage = torch.zeros_like(next_value)  # (B,)
    advantages_reversed = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        # a masked cell is not a step: carry the next real step's value and advantage across it
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_advantage = torch.where(m[:, t], advantage, next_advantage)
        advantages_reversed.append(torch.where(m[:, t], advantage, zero))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(m, advantages + values, zero)  # (B, T)
    return advantages, returns


def _group_index(
    scores: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """(group index of each sequence (B,), number of groups), checking every group has ≥ 2 members."""
    if scores.dim() != 1:
        raise ValueError(f"expected per-sequence scores of shape (B,), got {tuple(scores.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive groups) and group_ids (B,)")
    if group_size is not None:
        if group_size < 2 or scores.shape[0] % group_size != 0:
            raise ValueError(
                f"group_size must be ≥ 2 and divide the batch size {scores.shape[0]}, got {group_size}"
            )
        n_groups = scores.shape[0] // group_size
        index = torch.arange(n_groups, device=scores.device).repeat_interleave(group_size)  # (B,)
        return index, n_groups
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected {tuple(scores.shape)}")
    labels, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        raise ValueError(
            f"every group needs at least 2 responses for a baseline; groups {labels[counts < 2].tolist()} have 1"
        )
    return index.to(scores.device), labels.shape[0]


def _group_sums(x: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of x (B,) within each group, gathered back to (B,)."""
    sums = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)  # (G,)
    return sums[index]  # (B,)


def grpo_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO: (r − mean_group) / (std_group + eps), std unbiased (n − 1). scores (B,) → (B,).

    A group whose scores are all equal gets advantage 0 (nothing to learn from it).
    """
    index, n_groups = _group_index(scores, group_size, group_ids)
    ones = torch.ones_like(scores)
    count = _group_sums(ones, index, n_groups)  # (B,)
    mean = _group_sums(scores, index, n_groups) / count  # (B,)
    centered = scores - mean  # (B,)
    if not scale_by_std:
        return centered
    std = torch.sqrt(_group_sums(centered**2, index, n_groups) / (count - 1))  # (B,) unbiased
    return centered / (std + eps)


def rloo_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOO: r_i − mean_{j≠i} r_j within each group. scores (B,) → (B,)."""
    index, n_groups = _group_index(scores, group_size, group_ids)
    count = _group_sums(torch.ones_like(scores), index, n_groups)  # (B,)
    leave_one_out_mean = (_group_sums(scores, index, n_groups) - scores) / (count - 1)  # (B,)
    return scores - leave_one_out_mean


def broadcast_to_tokens(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every response token its sequence's advantage: (B,) → (B, T), 0 at masked cells."""
    if sequence_advantages.dim() != 1 or mask.dim() != 2 or sequence_advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected advantages (B,) and mask (B, T), got {tuple(sequence_advantages.shape)} "
            f"and {tuple(mask.shape)}"
        )
    zero = torch.zeros((), dtype=sequence_advantages.dtype, device=sequence_advantages.device)
    return torch.where(mask.bool(), sequence_advantages[:, None], zero)
