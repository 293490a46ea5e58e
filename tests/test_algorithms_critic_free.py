"""Dr.GRPO, DAPO, GSPO and REINFORCE++ pieces, against numbers worked out by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algorithms import (aggregate_token_losses, gspo_policy_loss, informative_groups, overlong_penalty,
                                 policy_loss, reinforce_pp_advantages)

NAN = float("nan")
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),  # every token alike
    ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),  # every sequence alike
    ("seq-mean-token-sum", (6 + 4) / 2),
])
def test_loss_aggregation_modes(mode, expected):
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])  # padding never enters
    assert_close(aggregate_token_losses(losses, MASK, mode), torch.tensor(expected))


def test_dr_grpo_divides_every_sequence_by_one_constant():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    assert_close(aggregate_token_losses(losses, MASK, "seq-mean-token-sum-norm", norm_length=4),
                 torch.tensor((6 / 4 + 4 / 4) / 2))
    with pytest.raises(ValueError, match="norm_length"):
        aggregate_token_losses(losses, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_token_losses(losses, MASK, "sum")


def test_informative_groups_are_those_whose_rewards_differ():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert informative_groups(scores, 2).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="multiple of group_size"):
        informative_groups(scores, 4)


def test_overlong_penalty_falls_linearly_over_the_buffer():
    lengths = torch.tensor([5, 6, 8, 10, 12])  # budget 10, buffer 4: free up to 6 tokens
    assert_close(overlong_penalty(lengths, 10, 4, factor=1.0), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert_close(overlong_penalty(lengths, 10, 4, factor=0.5)[2], torch.tensor(-0.25))


def test_gspo_clips_the_geometric_mean_ratio_of_each_sequence():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [-0.2, NAN]])  # sequence ratios e^0.2 and e^-0.2
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([1.0, -1.0])
    s0, s1 = math.exp(0.2), math.exp(-0.2)
    loss, stats = gspo_policy_loss(logp, old, advantages, mask, clip_eps_low=0.5, clip_eps_high=0.5)
    assert_close(loss, torch.tensor((-s0 + s1) / 2))  # inside the clip range
    assert stats["clipfrac"] == 0 and torch.isclose(stats["ratio_mean"], torch.tensor((s0 + s1) / 2))
    loss, stats = gspo_policy_loss(logp, old, advantages, mask, clip_eps_low=0.1, clip_eps_high=0.1)
    assert_close(loss, torch.tensor((-1.1 + 0.9) / 2))  # both clipped: -min(1.22 * 1, 1.1 * 1), -min(-0.82, -0.9)
    assert stats["clipfrac"] == 1


def test_gspo_gradient_flows_through_unclipped_sequences_only():
    logp = torch.tensor([[0.1, 0.3], [-0.05, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = gspo_policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), mask, 0.1, 0.1)
    loss.backward()
    # sequence 0 is clipped (ratio 1.22 > 1.1, A > 0): no gradient; sequence 1 (ratio e^-0.05, inside):
    # d/dlogp_0 of -A s / 2 with s = exp(logp_0 / 1) is s / 2
    assert_close(logp.grad, torch.tensor([[0.0, 0.0], [math.exp(-0.05) / 2, 0.0]]))


def test_decoupled_clip_lets_the_ratio_of_a_good_token_grow_further():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    symmetric, _ = policy_loss(logp, old, advantages, mask, clip_eps=0.2)
    higher, _ = policy_loss(logp, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert_close(symmetric, torch.tensor((-1.2 + 0.8) / 2))  # ratios clipped to 1.2 and 0.8
    assert_close(higher, torch.tensor((-1.28 + 0.8) / 2))  # the upper bound moves; the lower does not


def test_reinforce_pp_whitens_the_return_to_go_over_the_batch():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [0.2, NAN, NAN]])  # KL penalty per token, score at the end
    returns = [0.8, 0.9, 1.0, 0.2]  # 1.0 - 0.1 - 0.1, 1.0 - 0.1, 1.0; 0.2
    mean = sum(returns) / 4  # 0.725
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 3)  # unbiased, as masked_whiten
    expected = torch.tensor([[(0.8 - mean) / std, (0.9 - mean) / std, (1.0 - mean) / std],
                             [(0.2 - mean) / std, 0.0, 0.0]])
    assert_close(reinforce_pp_advantages(rewards, MASK), expected, rtol=1e-5, atol=1e-6)


def test_dynamic_sampling_keeps_the_groups_whose_rewards_differ():
    from types import SimpleNamespace

    from rlhf_ray.learner.driver import split_informative_groups

    episodes = [SimpleNamespace(reward=r, name=i) for i, r in enumerate([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.25])]
    informative, dropped = split_informative_groups(episodes, 2)
    assert [[e.name for e in g] for g in informative] == [[2, 3], [6, 7]]
    assert [[e.name for e in g] for g in dropped] == [[0, 1], [4, 5]]
