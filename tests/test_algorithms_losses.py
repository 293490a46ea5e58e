"""PPO policy and value losses, KL loss, log-probs and entropy, against numbers worked out by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algorithms import (entropy_from_logits, explained_variance, kl_loss, logprobs_from_logits,
                                 masked_entropy, policy_loss, value_loss)

NAN = float("nan")


def _log_ratios(*ratios):
    return torch.tensor([[math.log(r) for r in ratios]])


# Policy loss, clip_eps = 0.2. old_logp = 0 so that logp = log(ratio). Four response tokens + one pad.
#   token  ratio  A    -A*ratio  -A*clip(ratio, 0.8, 1.2)  max    clipped term larger?
#   0      1.5    1    -1.5      -1.2                      -1.2   yes
#   1      0.5    1    -0.5      -0.8                      -0.5   no  (pessimistic: keep the unclipped)
#   2      1.1   -2     2.2       2.2                       2.2   no  (inside the range)
#   3      0.7   -1     0.7       0.8                       0.8   yes
# loss = (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 1.3 / 4 = 0.325 ; clipfrac = 2 / 4 = 0.5
# ratio_mean = (1.5 + 0.5 + 1.1 + 0.7) / 4 = 0.95
# approxkl = mean((ratio - 1) - log ratio)
#   = (0.5 - 0.4054651) + (-0.5 + 0.6931472) + (0.1 - 0.0953102) + (-0.3 + 0.3566749) over 4
#   = (0.0945349 + 0.1931472 + 0.0046898 + 0.0566749) / 4 = 0.3490468 / 4 = 0.0872617
POLICY_MASK = torch.tensor([[1, 1, 1, 1, 0]])
ADVANTAGES = torch.tensor([[1.0, 1.0, -2.0, -1.0, 0.0]])


def _policy_logp(pad_logp=0.0):
    return torch.cat([_log_ratios(1.5, 0.5, 1.1, 0.7), torch.tensor([[pad_logp]])], dim=1).requires_grad_()


def test_policy_loss_clipping_and_stats():
    logp = _policy_logp()
    loss, stats = policy_loss(logp, torch.zeros(1, 5), ADVANTAGES, POLICY_MASK, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.325))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    assert_close(stats["ratio_mean"], torch.tensor(0.95))
    assert_close(stats["approxkl"], torch.tensor(0.0872617))
    assert "dual_clipfrac" not in stats


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    # d loss / d logp_t = -A_t * ratio_t / 4 where unclipped, 0 where clipped:
    # token 1: -1 * 0.5 / 4 = -0.125 ; token 2: 2 * 1.1 / 4 = 0.55 ; tokens 0, 3 and the pad: 0
    logp = _policy_logp()
    loss, _ = policy_loss(logp, torch.zeros(1, 5), ADVANTAGES, POLICY_MASK, clip_eps=0.2)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.55, 0.0, 0.0]]))


def test_policy_loss_ignores_padding_even_when_it_would_overflow():
    # exp(1000) is inf and the padded advantage is NaN: neither may reach the loss or the gradient
    logp = _policy_logp(pad_logp=1000.0)
    advantages = ADVANTAGES.clone()
    advantages[0, 4] = NAN
    loss, stats = policy_loss(logp, torch.zeros(1, 5), advantages, POLICY_MASK, clip_eps=0.2)
    loss.backward()
    assert_close(loss, torch.tensor(0.325))
    assert_close(stats["approxkl"], torch.tensor(0.0872617))
    assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.55, 0.0, 0.0]]))


def test_policy_loss_dual_clip():
    # clip_eps = 0.2, dual_clip c = 3: for A < 0 the loss is min(max(...), -A * c)
    #   token  ratio  A    max(-A*r, -A*clip(r))   cap -A*c  final   dual-clipped?
    #   0      5     -1    max(5, 1.2) = 5          3         3      yes
    #   1      2     -1    max(2, 1.2) = 2          3         2      no
    #   2      5      1    max(-5, -1.2) = -1.2     (A > 0)  -1.2    no
    #   3      0.5   -4    max(2, 3.2) = 3.2        12        3.2    no
    # loss = (3 + 2 - 1.2 + 3.2) / 4 = 1.75 ; without dual clip (5 + 2 - 1.2 + 3.2) / 4 = 2.25
    # clipfrac: tokens 2 and 3 -> 0.5 ; dual_clipfrac: token 0 -> 0.25
    logp = _log_ratios(5.0, 2.0, 5.0, 0.5).requires_grad_()
    advantages = torch.tensor([[-1.0, -1.0, 1.0, -4.0]])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(logp, torch.zeros(1, 4), advantages, mask, clip_eps=0.2, dual_clip=3.0)
    assert_close(loss, torch.tensor(1.75))
    assert_close(stats["clipfrac"], torch.tensor(0.5))
    assert_close(stats["dual_clipfrac"], torch.tensor(0.25))
    plain_loss, _ = policy_loss(logp, torch.zeros(1, 4), advantages, mask, clip_eps=0.2)
    assert_close(plain_loss, torch.tensor(2.25))
    # the dual-clipped token gets no gradient; token 1: -(-1) * 2 / 4 = 0.5 ; tokens 2, 3 clipped
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]]))


def test_policy_loss_weights_off_policy_tokens_by_proximal_over_behaviour():
    # Decoupled PPO: old_logp is the proximal policy's (0 here), the sampler's is behaviour_logp; clip_eps 0.2,
    # behaviour_weight_cap 1.5. A third token is padding.
    #   token  ratio  A    max(-A*ratio, -A*clip)   w = pi_prox / pi_behaviour       loss x w
    #   0      1.1    1    -1.1 (inside the range)  1 / 0.5 = 2, capped at 1.5      -1.65
    #   1      1.5   -1     1.5 (unclipped larger)  1 / 0.8 = 1.25                  1.875
    # loss = (-1.65 + 1.875) / 2 = 0.1125; behaviour_weight_mean = (1.5 + 1.25) / 2 = 1.375
    # d loss / d logp = -A * ratio * w / 2: -1.1 * 1.5 / 2 = -0.825 and 1.5 * 1.25 / 2 = 0.9375
    logp = _log_ratios(1.1, 1.5, 1.0).requires_grad_(True)
    behaviour = torch.tensor([[math.log(0.5), math.log(0.8), -50.0]])
    mask, advantages = torch.tensor([[1, 1, 0]]), torch.tensor([[1.0, -1.0, 3.0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 3), advantages, mask, clip_eps=0.2, behaviour_logp=behaviour,
                              behaviour_weight_cap=1.5)
    assert loss.item() == pytest.approx(0.1125, abs=1e-6)
    assert stats["behaviour_weight_mean"].item() == pytest.approx(1.375, abs=1e-6)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.825, 0.9375, 0.0]]))
    # on-policy (behaviour == proximal) the weights are 1: the plain PPO loss
    plain, _ = policy_loss(logp.detach(), torch.zeros(1, 3), advantages, mask, clip_eps=0.2)
    same, _ = policy_loss(logp.detach(), torch.zeros(1, 3), advantages, mask, clip_eps=0.2,
                          behaviour_logp=torch.zeros(1, 3))
    assert same.item() == pytest.approx(plain.item())


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), dual_clip=0.5)


# Value loss, clip_eps = 0.2, old values all 0.5 (so clip(v) is in [0.3, 0.7]):
#   token  v    R    (v-R)^2  clip(v)  (clip(v)-R)^2  max    clipped term larger?
#   0      1.0  1.2  0.04     0.7      0.25           0.25   yes
#   1      0.6  0.0  0.36     0.6      0.36           0.36   no (inside the range)
#   2      0.0  0.1  0.01     0.3      0.04           0.04   yes
#   3      2.0  0.0  4.0      0.7      0.49           4.0    no (clipped but smaller)
# loss = 0.5 * (0.25 + 0.36 + 0.04 + 4.0) / 4 = 0.5 * 1.1625 = 0.58125 ; vf_clipfrac = 0.5
# unclipped: 0.5 * (0.04 + 0.36 + 0.01 + 4.0) / 4 = 0.5 * 1.1025 = 0.55125
VALUES = torch.tensor([[1.0, 0.6, 0.0, 2.0, NAN]])
OLD_VALUES = torch.tensor([[0.5, 0.5, 0.5, 0.5, 1e9]])
RETURNS = torch.tensor([[1.2, 0.0, 0.1, 0.0, -1e9]])
VALUE_MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_value_loss_clipped():
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.58125))
    assert_close(stats["vf_clipfrac"], torch.tensor(0.5))


def test_value_loss_unclipped():
    loss, stats = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_eps=None)
    assert_close(loss, torch.tensor(0.55125))
    assert_close(stats["vf_clipfrac"], torch.tensor(0.0))


def test_value_loss_gradient_ignores_padding():
    # d/dv of 0.5 * (v - R)^2 / 4 = (v - R) / 4 where the unclipped term wins (tokens 1, 3), else 0:
    # token 1: 0.6 / 4 = 0.15 ; token 3: 2 / 4 = 0.5
    values = VALUES.clone().requires_grad_()
    loss, _ = value_loss(values, OLD_VALUES, RETURNS, VALUE_MASK, clip_eps=0.2)
    loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, 0.15, 0.0, 0.5, 0.0]]))


def test_explained_variance():
    # R = (1, 2, 3, 4): mean 2.5, Var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # v = (1, 2, 2, 5): R - v = (0, 0, 1, -1), mean 0, Var = 2 / 4 = 0.5
    # EV = 1 - 0.5 / 1.25 = 0.6
    values = torch.tensor([[1.0, 2.0, 2.0, 5.0, NAN]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1e9]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.6))
    assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    assert torch.isnan(explained_variance(values, torch.ones(1, 5), mask))


def test_kl_loss_is_the_masked_mean_of_k3():
    # k3 at log r = (-0.5, 1, 0) is (0.1065307, 0.7182818, 0); mean over 3 tokens = 0.2749375
    logp = torch.tensor([[-1.0, -2.0, -0.5, 100.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert_close(kl_loss(logp, ref_logp, mask), torch.tensor(0.2749375))


# Logits (0, 0, ln 2) -> probabilities (1/4, 1/4, 1/2).
LOGITS = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])  # (1, 2, 3)


def test_logprobs_from_logits():
    # log(1/2) = -0.6931472 for label 2, log(1/4) = -1.3862944 for label 0
    assert_close(logprobs_from_logits(LOGITS, torch.tensor([[2, 0]])), torch.tensor([[-0.6931472, -1.3862944]]))


def test_logprobs_divide_logits_by_the_sampling_temperature():
    # T = 2: logits (0, 0, ln 2 / 2) -> weights (1, 1, sqrt 2), Z = 2 + sqrt 2
    # p(2) = sqrt2 / (2 + sqrt2) = sqrt2 - 1 = 0.4142136 -> log = -0.8813736
    # p(0) = 1 / (2 + sqrt2) = 0.2928932 -> log = -1.2279472
    logp = logprobs_from_logits(LOGITS, torch.tensor([[2, 0]]), temperature=2.0)
    assert_close(logp, torch.tensor([[-0.8813736, -1.2279472]]))
    # the same distribution a sampler at temperature 2 draws from
    sampling_distribution = torch.distributions.Categorical(logits=LOGITS / 2.0)
    assert_close(logp, sampling_distribution.log_prob(torch.tensor([[2, 0]])))


def test_entropy_from_logits():
    # H(1/4, 1/4, 1/2) = 2 * 1/4 * ln 4 + 1/2 * ln 2 = 0.6931472 + 0.3465736 = 1.0397208
    assert_close(entropy_from_logits(LOGITS), torch.tensor([[1.0397208, 1.0397208]]))
    # T = 2: H = 2 * 0.2928932 * 1.2279472 + 0.4142136 * 0.8813736 = 0.7193103 + 0.3650768 = 1.0843871
    assert_close(entropy_from_logits(LOGITS, temperature=2.0)[0, 0], torch.tensor(1.0843871))


def test_masked_entropy_averages_response_tokens_only():
    # token 0 uniform over 4: ln 4 = 1.3862944
    # token 1 probabilities (1/6, 1/6, 1/3, 1/3): 2/6 ln 6 + 2/3 ln 3 = 0.5972532 + 0.7324082 = 1.3296614
    # token 2 is padding (nearly deterministic, entropy ~0); mean over 2 tokens = 1.3579779
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0), math.log(2.0)], [50.0, 0.0, 0.0, 0.0]]])
    assert_close(masked_entropy(logits, torch.tensor([[1, 1, 0]])), torch.tensor(1.3579779))
