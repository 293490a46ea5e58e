"""GAE, GRPO and RLOO advantages, against numbers worked out by hand."""

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algorithms import broadcast_to_tokens, gae, grpo_advantages, rloo_advantages

NAN = float("nan")


def test_gae_three_tokens_gamma_1_lambda_half():
    # r = (0, 0, 1), V = (0.5, 0.4, 0.8), gamma = 1, lambda = 0.5, V after the last token = 0
    # t=2: delta = 1 + 0 - 0.8 = 0.2             A2 = 0.2
    # t=1: delta = 0 + 0.8 - 0.4 = 0.4           A1 = 0.4 + 0.5 * 0.2 = 0.5
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1          A0 = -0.1 + 0.5 * 0.5 = 0.15
    # returns = A + V = (0.65, 0.9, 1.0)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[0.15, 0.5, 0.2]]))
    assert_close(returns, torch.tensor([[0.65, 0.9, 1.0]]))


def test_gae_with_lambda_1_is_discounted_return_minus_value():
    # gamma = 0.9, lambda = 1
    # t=2: delta = 1 - 0.8 = 0.2                 A2 = 0.2
    # t=1: delta = 0.9 * 0.8 - 0.4 = 0.32        A1 = 0.32 + 0.9 * 0.2 = 0.5
    # t=0: delta = 0.9 * 0.4 - 0.5 = -0.14       A0 = -0.14 + 0.9 * 0.5 = 0.31
    # check: G = (0.81, 0.9, 1) and G - V = (0.31, 0.5, 0.2)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert_close(advantages, torch.tensor([[0.31, 0.5, 0.2]]))


# Row 0: the 3-token case above plus one pad. Row 1: 2 response tokens, then 2 tokens after EOS.
# Row 1, gamma = 1, lambda = 0.5, bootstrap 0 after t=1:
# t=1: delta = 2 + 0 - 0.5 = 1.5                 A1 = 1.5
# t=0: delta = -0.1 + 0.5 - 1 = -0.6             A0 = -0.6 + 0.5 * 1.5 = 0.15
# returns = (1.15, 2.0)
BATCH_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
EXPECTED_ADVANTAGES = torch.tensor([[0.15, 0.5, 0.2, 0.0], [0.15, 1.5, 0.0, 0.0]])
EXPECTED_RETURNS = torch.tensor([[0.65, 0.9, 1.0, 0.0], [1.15, 2.0, 0.0, 0.0]])


@pytest.mark.parametrize("pad_reward, pad_value", [(0.0, 0.0), (9.0, 7.0), (NAN, NAN), (-1e9, 1e9)])
def test_gae_ignores_padding_and_tokens_after_eos(pad_reward, pad_value):
    p, v = pad_reward, pad_value
    rewards = torch.tensor([[0.0, 0.0, 1.0, p], [-0.1, 2.0, p, p]])
    values = torch.tensor([[0.5, 0.4, 0.8, v], [1.0, 0.5, v, v]])
    advantages, returns = gae(rewards, values, BATCH_MASK, gamma=1.0, lam=0.5)
    assert_close(advantages, EXPECTED_ADVANTAGES)
    assert_close(returns, EXPECTED_RETURNS)


def test_gae_skips_masked_cells_inside_a_response():
    # mask (1, 0, 1): the middle cell is not a step. gamma = 1, lambda = 0.5
    # t=2: delta = 1 - 0.8 = 0.2                 A2 = 0.2
    # t=0: delta = 0 + 0.8 - 0.5 = 0.3           A0 = 0.3 + 0.5 * 0.2 = 0.4   (V and A of t=2 carried across t=1)
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.8]])
    advantages, returns = gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=1.0, lam=0.5)
    assert_close(advantages, torch.tensor([[0.4, 0.0, 0.2]]))
    assert_close(returns, torch.tensor([[0.9, 0.0, 1.0]]))


def test_grpo_uses_the_unbiased_std_and_zero_variance_group_gets_zero():
    # group (1, 2, 3): mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> (-1, 0, 1) / (1 + 1e-6)
    #   (the biased std sqrt(2/3) would give +-1.2247)
    # group (5, 5, 5): std 0 -> 0 / (0 + 1e-6) = 0
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    advantages = grpo_advantages(scores, group_size=3)
    one = 1.0 / (1.0 + 1e-6)
    assert_close(advantages, torch.tensor([-one, 0.0, one, 0.0, 0.0, 0.0]))


def test_grpo_with_group_ids():
    # group 7 = (1, 3): mean 2, unbiased std sqrt(2) -> -+1/sqrt(2) = -+0.7071068
    # group 3 = (4, 8): mean 6, unbiased std sqrt(8) -> -+2/sqrt(8) = -+0.7071068
    scores = torch.tensor([1.0, 4.0, 3.0, 8.0])
    advantages = grpo_advantages(scores, group_ids=torch.tensor([7, 3, 7, 3]), eps=0.0)
    assert_close(advantages, torch.tensor([-0.7071068, -0.7071068, 0.7071068, 0.7071068]))


def test_grpo_without_std_scaling_only_centres():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    assert_close(grpo_advantages(scores, group_size=3, scale_by_std=False), torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0]))


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match=r"groups \[4\] have 1"):
        grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), group_ids=torch.tensor([0, 0, 4]))
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=2)


def test_rloo_group_of_three():
    # group (1, 2, 6): 1 - (2 + 6)/2 = -3 ; 2 - (1 + 6)/2 = -1.5 ; 6 - (1 + 2)/2 = 4.5
    # group (0, 0, 3): 0 - 1.5 = -1.5 ; 0 - 1.5 = -1.5 ; 3 - 0 = 3
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert_close(rloo_advantages(scores, group_size=3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    assert_close(rloo_advantages(scores, group_ids=ids), rloo_advantages(scores, group_size=3))


def test_sequence_advantage_is_broadcast_over_response_tokens_only():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert_close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
