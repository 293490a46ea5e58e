"""RLlib's PPO (new API stack) trains `TokenGRUModule` on the text env: the module alone, then one real iteration."""

import math

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch
from ray import tune
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, LEARNER_RESULTS, NUM_EPISODES

from envs import ENV_ID
from rlhf_ray.rllib_module import TokenGRUModule, make_text_generation_env

MODEL_CONFIG = {"embedding_dim": 16, "hidden_dim": 32}


def build_module(env):
    return TokenGRUModule(observation_space=env.observation_space, action_space=env.action_space,
                          model_config=MODEL_CONFIG)


def as_batch(observation):
    """One env observation as the module's input: the Dict kept, each entry with a batch dim of 1."""
    return {Columns.OBS: {key: torch.as_tensor(np.asarray(value))[None] for key, value in observation.items()}}


def test_module_reads_the_last_observed_token_and_ignores_the_padding():
    env = make_text_generation_env({"max_new_tokens": 8})
    module = build_module(env)
    observation, _ = env.reset(seed=0)
    length = int(observation["length"])
    outputs = module.forward_inference(as_batch(observation))
    values = module.compute_values(as_batch(observation))
    assert outputs[Columns.ACTION_DIST_INPUTS].shape == (1, env.action_space.n)
    assert values.shape == (1,)

    padded_differently = {**observation, "input_ids": observation["input_ids"].copy()}
    padded_differently["input_ids"][length:] = 5  # tokens after `length` are padding, whatever they hold
    torch.testing.assert_close(module.forward_inference(as_batch(padded_differently))[Columns.ACTION_DIST_INPUTS],
                               outputs[Columns.ACTION_DIST_INPUTS])

    other_last_token = {**observation, "input_ids": observation["input_ids"].copy()}
    other_last_token["input_ids"][length - 1] = (observation["input_ids"][length - 1] + 1) % env.action_space.n
    assert not torch.allclose(module.forward_inference(as_batch(other_last_token))[Columns.ACTION_DIST_INPUTS],
                              outputs[Columns.ACTION_DIST_INPUTS])


def test_module_rejects_a_flattened_observation_space():
    env = make_text_generation_env({"max_new_tokens": 8})
    flat = gym.spaces.utils.flatten_space(env.observation_space)
    with pytest.raises(ValueError, match="FlattenObservations"):
        TokenGRUModule(observation_space=flat, action_space=env.action_space, model_config=MODEL_CONFIG)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ppo_trains_one_iteration_on_the_text_env(ray_cluster):
    tune.register_env(ENV_ID, make_text_generation_env)
    config = (
        PPOConfig()
        .environment(ENV_ID, env_config={"max_new_tokens": 8})
        # one remote env runner: the module and the env are built in another process, weights synced to it
        .env_runners(num_env_runners=1, rollout_fragment_length=64)
        .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1, lr=1e-3)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=TokenGRUModule, model_config=MODEL_CONFIG))
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        before = {name: np.array(value) for name, value in algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}
        result = algo.train()
        after = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        runner_module = algo.get_module()  # the remote env runner's copy
    finally:
        algo.stop()

    env_runner_results = result[ENV_RUNNER_RESULTS]
    assert env_runner_results[NUM_EPISODES] >= 1
    assert -1.0 <= env_runner_results[EPISODE_RETURN_MEAN] <= 1.0  # the sentiment reward's range

    learner_stats = result[LEARNER_RESULTS][DEFAULT_MODULE_ID]
    for name in ("policy_loss", "vf_loss", "entropy"):
        assert math.isfinite(learner_stats[name]), f"learner stat {name} is {learner_stats[name]}"

    for name in ("gru.weight_ih_l0", "gru.weight_hh_l0", "policy_head.weight", "value_head.weight"):
        assert not np.allclose(before[name], np.array(after[name])), f"{name} did not change in the PPO update"

    assert isinstance(runner_module, TokenGRUModule)
    for name, value in runner_module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), np.array(after[name]), err_msg=f"env runner's {name}")
