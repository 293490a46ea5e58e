"""Build a `Sampler` from a run configuration and sample one batch: what `rlhf-ray sample` runs."""

from __future__ import annotations

from rlhf_ray.config import RunConfig
from rlhf_ray.models import load_policy
from rlhf_ray.rewards.composite import build_reward
from rlhf_ray.rollout.sampler import DialogueParams, Episode, Sampler, SamplingParams, episode_seed


def sampling_params(config: RunConfig) -> SamplingParams:
    sampling, dialogue = config.rollout.sampling, config.rollout.dialogue
    return SamplingParams(max_new_tokens=config.rollout.max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, greedy=sampling.greedy,
                          dialogue=None if dialogue is None else DialogueParams(**dialogue.model_dump()))


def prompt_texts(config: RunConfig, tokenizer=None) -> list[str]:
    """The PPO prompts: `data.prompts`, `data.prompt_dataset` (chat-formatted for `tokenizer`'s template),
    or the toy environment's built-in prompts."""
    from envs.builtin import BUILTIN_PROMPTS

    if config.data.prompt_dataset is not None:
        return [r.prompt for r in config.data.prompt_dataset.load_prompts(tokenizer)]
    return list(config.data.prompts) if config.data.prompts is not None else list(BUILTIN_PROMPTS)


def held_out_prompt_texts(config: RunConfig, tokenizer=None) -> list[str]:
    """The first `train.eval_prompts` prompts of `data.eval_dataset`, formatted as the PPO prompts are."""
    return [r.prompt for r in config.data.eval_dataset.load_prompts(tokenizer)[:config.train.eval_prompts]]


def reward_spec(config: RunConfig) -> dict:
    """The `reward` section with "{run}" expanded to the absolute run folder, as rollout workers get it."""
    from pathlib import Path

    run_dir = str(Path(config.run_dir).resolve())
    spec = config.reward.model_dump()
    if spec["function"]:
        spec["function"] = spec["function"].replace("{run}", run_dir)
    for component in (spec["components"] or {}).values():
        if component["model"]:
            component["model"] = component["model"].replace("{run}", run_dir)
    return spec


def sample_from_config(config: RunConfig, iteration: int = 0) -> list[Episode]:
    """One batch of `rollout.batch_size` episodes over the configured prompts, cycled in order."""
    model, tokenizer = load_policy(config.expand(config.model.policy))
    texts = prompt_texts(config, tokenizer)
    indices = [(iteration * config.rollout.batch_size + i) % len(texts) for i in range(config.rollout.batch_size)]
    prompt_ids = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in indices]
    seeds = [episode_seed(config.seed, iteration, i) for i in range(config.rollout.batch_size)]
    sampler = Sampler(model, tokenizer, build_reward(reward_spec(config)), sampling_params(config),
                      max_length=config.rollout.max_length, max_batch=config.rollout.max_batch)
    return sampler.generate(prompt_ids, seeds)
