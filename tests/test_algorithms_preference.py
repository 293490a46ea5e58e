"""Preference losses (rlhf_ray/algorithms/preference.py) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.preference import (
    averages_log_probs, dpo_loss, ipo_loss, sequence_logps, simpo_loss, with_chosen_nll,
)

# Two pairs. Pair 0: the policy raised the chosen response by 0.5 nats over the reference and lowered the
# rejected one by 0.5, so h = 0.5 - (-0.5) = 1. Pair 1: the other way round, h = -1.
POLICY_CHOSEN = torch.tensor([-1.0, -3.0])
POLICY_REJECTED = torch.tensor([-2.0, -1.0])
REFERENCE_CHOSEN = torch.tensor([-1.5, -2.5])
REFERENCE_REJECTED = torch.tensor([-1.5, -1.5])


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log(1.0 + math.exp(x))


def test_sequence_logps_sum_or_average_only_response_tokens():
    token_logps = torch.tensor([[-9.0, -1.0, -2.0, -7.0],
                                [-9.0, -9.0, -0.5, -0.5]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # prompt and padding masked out
    assert sequence_logps(token_logps, mask).tolist() == [-3.0, -1.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == [-1.5, -0.5]


def test_a_response_without_tokens_is_an_error_not_a_nan():
    with pytest.raises(ValueError, match=r"responses \[1\] have no response tokens"):
        sequence_logps(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), average=True)


def test_dpo_by_hand():
    # beta h = 0.1 and -0.1: -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397, -log sigmoid(-0.1) = 0.744397
    out = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.644397, 0.744397], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([softplus(-0.1), softplus(0.1)])
    # implicit rewards beta (log pi - log ref): chosen 0.05, -0.05; rejected -0.05, 0.05
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.05])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.05])
    metrics = out.metrics()
    assert metrics["rewards/accuracies"] == 0.5 and metrics["rewards/margins"] == pytest.approx(0.0)
    assert metrics["loss"] == pytest.approx((0.644397 + 0.744397) / 2, abs=1e-6)


def test_conservative_dpo_by_hand():
    # e = 0.1: 0.9 * log(1 + e^-0.1) + 0.1 * log(1 + e^0.1) = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    out = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                   label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.654397, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(0.9 * 0.744397 + 0.1 * 0.644397, abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5).losses.sum().backward()
    # d/dh of -log sigmoid(beta h) at h = 0 is -beta / 2 = -0.25: descent raises chosen, lowers rejected
    assert chosen.grad.item() == pytest.approx(-0.25) and rejected.grad.item() == pytest.approx(0.25)


def test_ipo_by_hand():
    # h = 1 and -1, beta = 0.1: target 1 / (2 beta) = 5; (1 - 5)^2 = 16, (-1 - 5)^2 = 36
    out = ipo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)
    assert out.losses.tolist() == pytest.approx([16.0, 36.0])
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.05])
    # at the target the loss and its gradient are 0
    chosen = torch.tensor([5.0], requires_grad=True)
    at_target = ipo_loss(chosen, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
    at_target.losses.sum().backward()
    assert at_target.losses.item() == 0.0 and chosen.grad.item() == 0.0


def test_simpo_by_hand():
    # averaged log-probs -0.5 (chosen) and -1.0 (rejected), beta 2, gamma 0.5: 2 * 0.5 - 0.5 = 0.5;
    # -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    out = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(0.474077, abs=1e-6)
    assert out.chosen_rewards.item() == -1.0 and out.rejected_rewards.item() == -2.0
    assert out.metrics()["rewards/margins"] == pytest.approx(1.0)
    assert out.metrics()["rewards/accuracies"] == 1.0


def test_rpo_adds_the_chosen_nll_per_token_by_hand():
    # DPO on h = (-4 - -5) - (-9 - -6) = 4 with beta 0.5: -log sigmoid(2) = 0.126928; the chosen response's
    # 4 tokens hold -4 nats, 1 per token: + 0.5 x 1 = 0.626928
    out = dpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-5.0]), torch.tensor([-6.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.126928, abs=1e-6)
    rpo = with_chosen_nll(out, torch.tensor([-4.0]), torch.tensor([4]), alpha=0.5, averaged=False)
    assert rpo.losses.item() == pytest.approx(0.626928, abs=1e-6)
    assert torch.equal(rpo.chosen_rewards, out.chosen_rewards)  # the implicit rewards are the method's
    # already averaged (IPO, SimPO): -1.5 per token, alpha 2 -> + 3
    averaged = with_chosen_nll(out, torch.tensor([-1.5]), torch.tensor([4]), alpha=2.0, averaged=True)
    assert averaged.losses.item() == pytest.approx(0.126928 + 3.0, abs=1e-6)
    assert with_chosen_nll(out, torch.tensor([-4.0]), torch.tensor([4]), alpha=0.0, averaged=False) is out
    # its gradient raises the chosen response's log-prob
    chosen = torch.tensor([-4.0], requires_grad=True)
    with_chosen_nll(out, chosen, torch.tensor([4]), alpha=1.0, averaged=False).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match=">= 0"):
        with_chosen_nll(out, torch.tensor([-4.0]), torch.tensor([4]), alpha=-1.0, averaged=False)


def test_which_methods_average_their_log_probs():
    assert not averages_log_probs("dpo") and averages_log_probs("ipo") and averages_log_probs("simpo")


@pytest.mark.parametrize("call, message", [
    (lambda: dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.0), "beta"),
    (lambda: dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                      label_smoothing=0.5), "label_smoothing"),
    (lambda: dpo_loss(POLICY_CHOSEN, POLICY_REJECTED[:1], REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1), "shape"),
    (lambda: simpo_loss(POLICY_CHOSEN[:, None], POLICY_REJECTED[:, None], beta=2.0, gamma=0.5), "shape"),
])
def test_bad_settings_are_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
