"""KL estimators, the KL-penalised reward and the KL controllers, against numbers worked out by hand."""

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algorithms import (AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3,
                                 kl_penalized_rewards, place_sequence_reward)

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF_LOGP = torch.tensor([[-1.5, -1.0, -0.5]])


def test_kl_k1_is_the_log_ratio():
    # logp - ref = (-1 + 1.5, -2 + 1, -0.5 + 0.5)
    assert_close(kl_k1(LOGP, REF_LOGP), torch.tensor([[0.5, -1.0, 0.0]]))


def test_kl_k2_is_half_the_squared_log_ratio():
    # 0.5 * (0.25, 1, 0)
    assert_close(kl_k2(LOGP, REF_LOGP), torch.tensor([[0.125, 0.5, 0.0]]))


def test_kl_k3_is_nonnegative_and_matches_hand_values():
    # log r = ref - logp = (-0.5, 1, 0)
    # exp(-0.5) - (-0.5) - 1 = 0.6065307 + 0.5 - 1 = 0.1065307
    # exp(1) - 1 - 1 = 2.7182818 - 2 = 0.7182818
    # exp(0) - 0 - 1 = 0
    assert_close(kl_k3(LOGP, REF_LOGP), torch.tensor([[0.1065307, 0.7182818, 0.0]]))
    assert_close(kl_estimate(LOGP, REF_LOGP, "k3"), kl_k3(LOGP, REF_LOGP))


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(LOGP, REF_LOGP, "k4")


def test_sequence_reward_goes_on_the_last_response_token():
    # row 0 ends at t=2 (EOS), row 1 is one token long, row 2 fills the whole budget
    scores = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    expected = torch.tensor([[0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    assert_close(place_sequence_reward(scores, mask), expected)


def test_sequence_reward_needs_a_response_token():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        place_sequence_reward(torch.tensor([1.0, 2.0]), torch.tensor([[1, 0], [0, 0]]))


# Row 0: 3 response tokens. Row 1: 2 response tokens, then a token after EOS with garbage log-probs.
SCORES = torch.tensor([1.0, 2.0])
POLICY_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 5.0]])
REFERENCE_LOGP = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.3, -9.0]])
RESPONSE_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_kl_penalized_rewards_k1():
    # beta = 0.1; k1 row 0 = (0.5, -1, 0), row 1 = (0.2, 0, masked)
    # rewards row 0 = (-0.05, 0.1, 0 + score 1) ; row 1 = (-0.02, 0 + score 2, 0)
    rewards, kl = kl_penalized_rewards(SCORES, POLICY_LOGP, REFERENCE_LOGP, RESPONSE_MASK, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.05, 0.1, 1.0], [-0.02, 2.0, 0.0]]))


def test_kl_penalized_rewards_k3():
    # k3 row 0 = (0.1065307, 0.7182818, 0) (see above)
    # k3 row 1: log r = (-0.2, 0) -> exp(-0.2) + 0.2 - 1 = 0.8187308 - 0.8 = 0.0187308, then 0
    rewards, kl = kl_penalized_rewards(SCORES, POLICY_LOGP, REFERENCE_LOGP, RESPONSE_MASK, 0.1, estimator="k3")
    assert_close(kl, torch.tensor([[0.1065307, 0.7182818, 0.0], [0.0187308, 0.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.01065307, -0.07182818, 1.0], [-0.00187308, 2.0, 0.0]]))


def test_kl_penalized_rewards_ignore_tokens_after_eos():
    garbage_logp = POLICY_LOGP.clone()
    garbage_logp[1, 2] = float("nan")
    garbage_ref = REFERENCE_LOGP.clone()
    garbage_ref[1, 2] = 1e6
    for estimator in ("k1", "k2", "k3"):
        clean = kl_penalized_rewards(SCORES, POLICY_LOGP, REFERENCE_LOGP, RESPONSE_MASK, 0.1, estimator)
        dirty = kl_penalized_rewards(SCORES, garbage_logp, garbage_ref, RESPONSE_MASK, 0.1, estimator)
        assert_close(dirty, clean)


def test_adaptive_kl_controller_sequence():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped to 0.2; beta = 0.1 * (1 + 0.2 * 10/100) = 0.1 * 1.02 = 0.102
    assert_close(controller.update(9.0, n_steps=10), 0.102)
    # KL 3: e = -0.5 -> -0.2; beta = 0.102 * (1 - 0.02) = 0.09996
    assert_close(controller.update(3.0, n_steps=10), 0.09996)
    # KL 6.6: e = 0.1 (inside the clip); beta = 0.09996 * (1 + 0.1 * 50/100) = 0.09996 * 1.05 = 0.104958
    assert_close(controller.update(6.6, n_steps=50), 0.104958)
    # KL on target: e = 0, beta unchanged
    assert_close(controller.update(6.0, n_steps=10), 0.104958)
    assert_close(controller.value, 0.104958)


def test_adaptive_kl_controller_resumes_exactly_from_its_state():
    controller = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    controller.update(8.0, 512)
    controller.update(2.5, 512)
    resumed = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value
    assert resumed.update(7.3, 512) == controller.update(7.3, 512)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 512) == 0.05
    assert controller.value == 0.05
    with pytest.raises(ValueError, match="'adaptive'"):
        controller.load_state_dict(AdaptiveKLController(0.1, 6, 100).state_dict())
