"""Pure PPO math for RLHF: torch and numpy only, no Ray, no DeepSpeed, no transformers.

* `masked`: masked sum / mean / variance / whitening over (B, T) response tokens, with hooks for
  statistics across data-parallel ranks.
* `kl`: per-token KL estimators (k1, k2, k3), the KL-penalised reward, KL controllers.
* `advantages`: GAE, GRPO and RLOO advantages.
* `losses`: PPO policy and value losses, KL loss, log-probs and entropy from logits, explained variance.
* `critic_free`: what Dr.GRPO, DAPO, GSPO and REINFORCE++ add: loss aggregation modes, informative groups,
  the overlong penalty, GSPO's sequence-level loss, REINFORCE++ advantages.
* `preference`: losses on preference pairs: DPO, conservative DPO, IPO, SimPO.

Tensors are per response token, (B, T), with a response mask (B, T) that is 1 for real response
tokens and 0 for padding and tokens after EOS.
"""

from rlhf_ray.algorithms.advantages import broadcast_to_tokens, gae, grpo_advantages, rloo_advantages
from rlhf_ray.algorithms.critic_free import (
    LossAggregation,
    aggregate_token_losses,
    gspo_policy_loss,
    informative_groups,
    overlong_penalty,
    reinforce_pp_advantages,
)
from rlhf_ray.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    place_sequence_reward,
)
from rlhf_ray.algorithms.losses import (
    entropy_from_logits,
    explained_variance,
    kl_loss,
    logprobs_from_logits,
    masked_entropy,
    policy_loss,
    value_loss,
)
from rlhf_ray.algorithms.masked import (
    SumReduce,
    masked_mean,
    masked_mean_var,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlhf_ray.algorithms.preference import (
    PreferenceLoss,
    PreferenceLossType,
    dpo_loss,
    ipo_loss,
    sequence_logps,
    simpo_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "LossAggregation",
    "PreferenceLoss",
    "PreferenceLossType",
    "SumReduce",
    "aggregate_token_losses",
    "broadcast_to_tokens",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "gspo_policy_loss",
    "informative_groups",
    "ipo_loss",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalized_rewards",
    "logprobs_from_logits",
    "masked_entropy",
    "masked_mean",
    "masked_mean_var",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "place_sequence_reward",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
    "value_loss",
]
