"""Reward functions `scores = reward(prompts, responses)`: adapters, checks, and the reward-model scorer.

No Ray and no DeepSpeed here: reward actors in `rollout`/`pipeline` wrap these plain functions.
`RewardModelScorer` (torch + transformers) is imported on first use.
"""

from rlhf_ray.rewards.base import RewardError, RewardFunction, RewardSpec, as_reward_function, import_from_string

__all__ = [
    "RewardError", "RewardFunction", "RewardModelScorer", "RewardSpec", "as_reward_function",
    "import_from_string", "join_prompt_response",
]


def __getattr__(name: str):
    if name in ("RewardModelScorer", "join_prompt_response"):
        from rlhf_ray.rewards import reward_model

        return getattr(reward_model, name)
    raise AttributeError(f"module 'rlhf_ray.rewards' has no attribute {name!r}")
