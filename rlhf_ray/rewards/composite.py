"""Composite rewards R = Q + lambda*S + mu*H: weighted sums of named components, each one logged.

    reward:
      components:
        quality: {function: rlhf_ray.rewards.quality:length_score, kwargs: {target: 25}, weight: 0.5}
        satisfaction: {function: my_pkg.scores:satisfaction, weight: 0.3}    # lambda
        human: {model: "{run}/reward_model", weight: 1.0}                    # mu

`build_reward` turns the `reward` section into one `RewardFunction` for the rollout workers. Its `score`
returns the components with the total (`RewardScores`): the environment hands them to the sampler with
each finished episode (`Episode.reward_components`), and the learner logs their `reward/<name>` means.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf_ray.config.schema import DEFAULT_REWARD
from rlhf_ray.rewards.base import RewardError, RewardFunction, RewardScores, as_reward_function, import_from_string


class CompositeReward:
    """`R(prompts, responses) = sum_i weight_i * component_i(prompts, responses)`, returned with each
    component's unweighted scores (a `RewardScores`), so they travel with the episodes they scored."""

    def __init__(self, components: dict[str, RewardFunction], weights: dict[str, float]):
        if not components:
            raise RewardError("a composite reward needs at least one component")
        if set(components) != set(weights):
            raise RewardError(f"components {sorted(components)} and weights {sorted(weights)} name different terms")
        self.components, self.weights = components, weights
        self.name = " + ".join(f"{weights[n]:g}*{n}" for n in components)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores:
        parts = {name: fn(prompts, responses) for name, fn in self.components.items()}
        total = np.zeros(len(prompts), dtype=np.float64)
        for name, scores in parts.items():
            total += self.weights[name] * scores
        return RewardScores(total, parts)


def _component(spec: dict, run_dir: str | None, device: str) -> RewardFunction:
    if spec.get("model") is not None:
        path = spec["model"].replace("{run}", run_dir) if run_dir else spec["model"]
        if "{run}" in path:
            raise RewardError(f"reward model path {path!r} uses {{run}} but no run folder was given")
        if not Path(path).is_dir():
            raise RewardError(f"reward model folder {path} does not exist (train it with `rlhf-ray pipeline`, "
                              "whose reward_model stage writes {run}/reward_model)")
        from rlhf_ray.rewards.reward_model import RewardModelScorer

        return RewardFunction(RewardModelScorer(path, device=device, normalize=spec.get("normalize", True)), path)
    fn = import_from_string(spec["function"])
    if not callable(fn):
        raise RewardError(f"reward {spec['function']!r} names a {type(fn).__name__}, not a function")
    kwargs = spec.get("kwargs") or {}
    return RewardFunction(functools.partial(fn, **kwargs) if kwargs else fn, spec["function"])


def build_reward(reward, run_dir: str | None = None, device: str = "cpu") -> RewardFunction:
    """The reward function of a `reward` config section (a `RewardConfig`, its dict, or a plain spec).

    `run_dir` replaces "{run}" in reward-model paths.
    """
    if hasattr(reward, "model_dump"):
        reward = reward.model_dump()
    if not isinstance(reward, dict):
        return as_reward_function(reward, device=device)
    timeout_s = reward.get("timeout_s")
    if reward.get("components"):
        components = {name: _component(spec, run_dir, device) for name, spec in reward["components"].items()}
        weights = {name: float(spec.get("weight", 1.0)) for name, spec in reward["components"].items()}
        composite = CompositeReward(components, weights)
        return RewardFunction(composite, composite.name, timeout_s=timeout_s)
    function = reward.get("function") or DEFAULT_REWARD
    if run_dir:
        function = function.replace("{run}", run_dir)
    fn = as_reward_function(function, device=device)
    return RewardFunction(fn.fn, fn.name, timeout_s=timeout_s)
