"""Build a `Sampler` from a run configuration and sample one batch: what `rlhf-ray sample` runs."""

from __future__ import annotations

from rlhf_ray.config import RunConfig
from rlhf_ray.models import load_policy
from rlhf_ray.rewards import as_reward_function
from rlhf_ray.rollout.sampler import Episode, Sampler, SamplingParams, episode_seed


def sampling_params(config: RunConfig) -> SamplingParams:
    sampling = config.rollout.sampling
    return SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, greedy=sampling.greedy)


def prompt_texts(config: RunConfig) -> list[str]:
    from envs.builtin import BUILTIN_PROMPTS

    return list(config.data.prompts) if config.data.prompts is not None else list(BUILTIN_PROMPTS)


def sample_from_config(config: RunConfig, iteration: int = 0) -> list[Episode]:
    """One batch of `rollout.batch_size` episodes over the configured prompts, cycled in order."""
    model, tokenizer = load_policy(config.model.policy)
    texts = prompt_texts(config)
    indices = [(iteration * config.rollout.batch_size + i) % len(texts) for i in range(config.rollout.batch_size)]
    prompt_ids = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in indices]
    seeds = [episode_seed(config.seed, iteration, i) for i in range(config.rollout.batch_size)]
    sampler = Sampler(model, tokenizer, as_reward_function(config.reward.function), sampling_params(config),
                      max_length=config.rollout.max_length)
    return sampler.generate(prompt_ids, seeds)
