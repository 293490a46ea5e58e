"""The vector text-generation environment: array state, batched scoring, Gymnasium 1.x autoreset."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from envs import BUILTIN_PROMPTS, ENV_ID, NO_PROMPT, TextGenerationEnv, TextGenerationVectorEnv, sentiment_reward
from rlhf_ray.models.tiny import VOCABULARY
from rlhf_ray.rewards import RewardError, as_reward_function

EOS, VOCAB = 1, len(VOCABULARY)


def word_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def random_actions(rng, n, eos_probability=0.15):
    return np.where(rng.random(n) < eos_probability, EOS, rng.integers(3, VOCAB, size=n))


def record_episodes(vec, steps, seed=0):
    """Step `vec` with random actions; every finished episode as (prompt_index, actions, final step results).

    Checks on the way the autoreset contract: an env that ended is reset in the next step (NEXT_STEP)
    or stays as it was until reset with a mask (DISABLED: done here every other step), and in both
    cases gives reward 0, not terminated, not truncated, while its action is ignored.
    """
    rng, n = np.random.default_rng(seed), vec.num_envs
    vec.reset(seed=seed)
    episode_actions = [[] for _ in range(n)]
    episode_prompt = vec.prompt_indices.copy()
    waiting = np.zeros(n, dtype=bool)  # ended in an earlier step
    episodes = []
    for step in range(steps):
        actions = random_actions(rng, n)
        before = vec.tokens.copy()
        observations, rewards, terminated, truncated, infos = vec.step(actions)
        for e in range(n):
            if waiting[e]:
                assert rewards[e] == 0.0 and not terminated[e] and not truncated[e]
                if vec.autoreset_mode == AutoresetMode.NEXT_STEP:
                    assert observations["length"][e] == observations["prompt_length"][e]  # a fresh prompt
                    episode_actions[e], episode_prompt[e], waiting[e] = [], vec.prompt_indices[e], False
                else:
                    np.testing.assert_array_equal(observations["input_ids"][e], before[e])
                continue
            episode_actions[e].append(int(actions[e]))
            if terminated[e] or truncated[e]:
                info = {key: infos[key][e] for key in ("prompt", "response", "prompt_index", "response_length")}
                assert all(infos[f"_{key}"][e] for key in info)
                observation = {key: value[e].copy() for key, value in observations.items()}
                final = (observation, rewards[e], terminated[e], truncated[e], info)
                episodes.append((int(episode_prompt[e]), episode_actions[e], final))
                waiting[e] = True
            else:
                assert rewards[e] == 0.0
        if vec.autoreset_mode == AutoresetMode.DISABLED and step % 2 == 1 and waiting.any():
            vec.reset(options={"reset_mask": waiting.copy()})
            for e in np.flatnonzero(waiting):
                episode_actions[e], episode_prompt[e], waiting[e] = [], vec.prompt_indices[e], False
    return episodes


def single_env_episode(env, prompt_index, actions):
    env.reset(options={"prompt_index": prompt_index})
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return observation, reward, terminated, truncated, info
        assert reward == 0.0
    raise AssertionError(f"episode of prompt {prompt_index} did not end after actions {actions}")


# ---------------------------------------------------------------------------------------- spaces and make_vec


def test_reset_and_step_give_batched_arrays_of_the_documented_dtypes():
    vec = TextGenerationVectorEnv(num_envs=4, max_new_tokens=5)
    observations, infos = vec.reset(seed=0)
    assert observations in vec.observation_space
    assert observations["input_ids"].shape == (4, vec.max_length) and observations["input_ids"].dtype == np.int64
    assert observations["length"].shape == observations["prompt_length"].shape == (4,)
    assert infos["prompt_index"].shape == (4,) and infos["_prompt_index"].all()
    observations, rewards, terminated, truncated, _ = vec.step(np.full(4, 5))
    assert observations in vec.observation_space
    assert rewards.shape == (4,) and rewards.dtype == np.float64
    assert terminated.dtype == truncated.dtype == np.bool_ and terminated.shape == truncated.shape == (4,)
    assert vec.action_space == gym.spaces.MultiDiscrete([VOCAB] * 4)
    assert vec.single_observation_space == TextGenerationEnv(max_new_tokens=5).observation_space


def test_make_vec_with_vector_entry_point_gives_the_vector_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", max_new_tokens=4,
                           autoreset_mode=AutoresetMode.DISABLED)
    assert isinstance(vec, TextGenerationVectorEnv) and vec.num_envs == 3 and vec.max_new_tokens == 4
    assert vec.metadata["autoreset_mode"] == AutoresetMode.DISABLED


def test_autoreset_mode_defaults_to_next_step_in_metadata():
    assert TextGenerationVectorEnv(num_envs=2).metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_same_step_autoreset_is_rejected():
    with pytest.raises(ValueError, match="expected AutoresetMode.NEXT_STEP or AutoresetMode.DISABLED"):
        TextGenerationVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)


# ---------------------------------------------------------------------------------------- as the single env


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_episodes_equal_the_single_env_for_the_same_actions(mode):
    kwargs = dict(max_new_tokens=6, max_length=10)  # long prompts hit max_length before max_new_tokens
    vec = TextGenerationVectorEnv(num_envs=6, autoreset_mode=mode, **kwargs)
    env = TextGenerationEnv(**kwargs)
    episodes = record_episodes(vec, steps=40)
    assert len(episodes) > 20
    assert {final[2] for _, _, final in episodes} == {True, False}  # both EOS and budget endings
    for prompt_index, actions, (observation, reward, terminated, truncated, info) in episodes:
        expected = single_env_episode(env, prompt_index, actions)
        for key in observation:
            np.testing.assert_array_equal(observation[key], expected[0][key])
        assert (reward, terminated, truncated) == expected[1:4]
        assert info == expected[4]


# ---------------------------------------------------------------------------------------- ends and rewards


def test_episodes_terminate_at_eos_and_truncate_at_max_new_tokens_and_max_length():
    vec = TextGenerationVectorEnv(num_envs=3, prompts=["the day", "i think the food is"], max_new_tokens=3,
                                  max_length=7, autoreset_mode=AutoresetMode.DISABLED)
    vec.reset(options={"prompt_indices": np.array([0, 0, 1])})  # prompt lengths 2, 2, 5
    _, _, terminated, truncated, _ = vec.step(np.array([EOS, 5, 5]))
    assert terminated.tolist() == [True, False, False] and truncated.tolist() == [False, False, False]
    _, _, terminated, truncated, _ = vec.step(np.array([5, 5, 5]))
    assert terminated.tolist() == [False, False, False] and truncated.tolist() == [False, False, True]  # 7 tokens
    _, _, terminated, truncated, infos = vec.step(np.array([5, 5, 5]))
    assert truncated.tolist() == [False, True, False]  # 3 new tokens
    assert infos["response_length"][1] == 3 and vec.response_lengths.tolist() == [1, 3, 2]


def test_reward_is_the_sentiment_of_the_decoded_episodes(tiny_tokenizer):
    vec = TextGenerationVectorEnv(num_envs=2, max_new_tokens=4, autoreset_mode=AutoresetMode.DISABLED)
    vec.reset(options={"prompt_indices": np.array([0, 1])})
    responses = [word_ids(tiny_tokenizer, "so great but sad"), word_ids(tiny_tokenizer, "good fun") + [EOS, EOS]]
    for step in range(4):
        _, rewards, terminated, truncated, infos = vec.step(np.array([responses[0][step], responses[1][step]]))
        if step == 2:
            assert rewards.tolist() == [0.0, 1.0] and infos["response"][1] == "good fun"
            assert infos["_response"].tolist() == [False, True]
    assert rewards[0] == sentiment_reward([""], ["so great but sad"])[0] == 0.0 and truncated[0]
    assert infos["prompt"][0] == BUILTIN_PROMPTS[0] and infos["prompt_index"][0] == 0


def test_reward_function_is_called_once_per_step_with_every_finishing_episode():
    calls = []

    def counting_reward(prompts, responses):
        calls.append(len(responses))
        return sentiment_reward(prompts, responses)

    vec = TextGenerationVectorEnv(num_envs=5, prompts=["the day was"], max_new_tokens=4, reward_fn=counting_reward)
    vec.reset(seed=0)
    vec.step(np.full(5, 5))
    assert calls == []
    vec.step(np.array([EOS, EOS, 5, 5, 5]))
    assert calls == [2]
    vec.step(np.array([5, 5, EOS, 5, 5]))  # envs 0 and 1 autoreset, env 2 ends
    assert calls == [2, 1]
    vec.step(np.full(5, 5))  # envs 3 and 4 reach 4 new tokens
    assert calls == [2, 1, 2]


def test_non_finite_reward_is_a_reward_error_naming_the_reward():
    reward = as_reward_function(lambda p, r: [0.0] + [float("inf")] * (len(r) - 1), name="inf-reward")
    vec = TextGenerationVectorEnv(num_envs=3, reward_fn=reward)
    vec.reset(seed=0)
    with pytest.raises(RewardError, match=r"reward 'inf-reward' returned a non-finite score \(inf\) for item 1"):
        vec.step(np.full(3, EOS))


# ---------------------------------------------------------------------------------------- autoreset and reset


def test_next_step_autoreset_restarts_an_ended_env_and_ignores_its_action():
    vec = TextGenerationVectorEnv(num_envs=2, max_new_tokens=3)
    vec.reset(options={"prompt_indices": np.array([0, 1])})
    vec.step(np.array([EOS, 5]))
    observations, rewards, terminated, truncated, infos = vec.step(np.array([40, 6]))
    assert rewards.tolist() == [0.0, 0.0] and not terminated.any() and not truncated.any() and infos == {}
    assert observations["length"][0] == observations["prompt_length"][0]  # a new prompt, action 40 ignored
    assert 40 not in observations["input_ids"][0, observations["length"][0]:]
    assert observations["length"][1] == observations["prompt_length"][1] + 2
    observations, *_ = vec.step(np.array([41, 7]))
    assert observations["input_ids"][0, observations["prompt_length"][0]] == 41


def test_disabled_autoreset_keeps_an_ended_env_ended_until_reset_with_a_mask():
    vec = TextGenerationVectorEnv(num_envs=2, max_new_tokens=5, autoreset_mode=AutoresetMode.DISABLED)
    vec.reset(options={"prompt_indices": np.array([0, 1])})
    final, *_ = vec.step(np.array([EOS, 5]))
    for _ in range(2):
        observations, rewards, terminated, truncated, infos = vec.step(np.array([40, 6]))
        np.testing.assert_array_equal(observations["input_ids"][0], final["input_ids"][0])
        assert rewards[0] == 0.0 and not terminated[0] and not truncated[0] and infos == {}
    observations, infos = vec.reset(options={"reset_mask": np.array([True, False]), "prompt_indices": np.array([3, 0])})
    assert observations["length"][0] == observations["prompt_length"][0] and vec.prompt_indices[0] == 3
    assert infos["_prompt_index"].tolist() == [True, False] and infos["prompt_index"][0] == 3
    assert observations["length"][1] == observations["prompt_length"][1] + 3  # untouched by the masked reset


def test_reset_mask_resets_only_the_masked_envs_mid_episode():
    vec = TextGenerationVectorEnv(num_envs=3, max_new_tokens=5)
    vec.reset(options={"prompt_indices": np.array([0, 1, 2])})
    before, *_ = vec.step(np.array([5, 6, 7]))
    observations, _ = vec.reset(options={"reset_mask": np.array([False, True, False]), "prompts": ["", "i felt", ""]})
    np.testing.assert_array_equal(observations["input_ids"][[0, 2]], before["input_ids"][[0, 2]])
    assert observations["length"][1] == observations["prompt_length"][1] == 2
    *_, infos = vec.step(np.array([EOS, EOS, EOS]))
    assert infos["prompt"].tolist() == [BUILTIN_PROMPTS[0], "i felt", BUILTIN_PROMPTS[2]]


def test_reset_with_explicit_prompts_and_prompt_ids(tiny_tokenizer):
    vec = TextGenerationVectorEnv(num_envs=2, max_new_tokens=2, max_length=12)
    vec.reset(options={"prompts": [BUILTIN_PROMPTS[4], "the book was very"]})
    assert vec.prompt_indices.tolist() == [4, NO_PROMPT]
    *_, infos = vec.step(np.array([EOS, EOS]))
    assert infos["prompt"].tolist() == [BUILTIN_PROMPTS[4], "the book was very"]
    vec.reset(options={"prompt_ids": [word_ids(tiny_tokenizer, "today i felt"), [3]]})
    *_, infos = vec.step(np.array([EOS, EOS]))
    assert infos["prompt"].tolist() == ["today i felt", VOCABULARY[3]]
    assert infos["prompt_index"].tolist() == [NO_PROMPT, NO_PROMPT]


def test_reset_with_the_same_seed_draws_the_same_prompts():
    vec = TextGenerationVectorEnv(num_envs=8)
    first = vec.reset(seed=3)[1]["prompt_index"].copy()
    np.testing.assert_array_equal(vec.reset(seed=3)[1]["prompt_index"], first)


def test_explicit_prompt_longer_than_max_length_is_a_value_error_naming_the_env():
    vec = TextGenerationVectorEnv(num_envs=2, prompts=["the day"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"options\['prompts'\]\[1\] has 5 tokens.*max_length=4"):
        vec.reset(options={"prompts": ["the day", "i think the food is"]})


# ---------------------------------------------------------------------------------------- buffers and errors


def test_copy_false_returns_the_internal_buffers_and_copy_true_copies():
    shared = TextGenerationVectorEnv(num_envs=2, copy=False)
    observations, _ = shared.reset(seed=0)
    assert observations["input_ids"] is shared.tokens and observations["length"] is shared.lengths
    copied = TextGenerationVectorEnv(num_envs=2)
    observations, _ = copied.reset(seed=0)
    copied.step(np.array([5, 5]))
    assert observations["length"].tolist() == copied.prompt_lengths.tolist()  # unchanged by the step


def test_response_ids_are_views_of_the_current_responses():
    vec = TextGenerationVectorEnv(num_envs=2, max_new_tokens=4)
    vec.reset(seed=0)
    vec.step(np.array([5, 6]))
    vec.step(np.array([7, 8]))
    assert vec.response_ids(1).tolist() == [6, 8] and vec.response_lengths.tolist() == [2, 2]


@pytest.mark.parametrize("actions, message", [
    (np.array([5, 5, 5]), r"shape \(2,\)"),
    (np.array([5.0, 5.0]), r"integer array"),
    (np.array([5, VOCAB]), rf"actions\[1\] is {VOCAB}, not a token id"),
])
def test_invalid_actions_are_value_errors(actions, message):
    vec = TextGenerationVectorEnv(num_envs=2)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        vec.step(actions)


def test_step_before_reset_is_an_error():
    with pytest.raises(RuntimeError, match="call reset"):
        TextGenerationVectorEnv(num_envs=2).step(np.array([5, 5]))


def test_reset_mask_must_be_a_bool_array_of_one_entry_per_env():
    vec = TextGenerationVectorEnv(num_envs=2)
    with pytest.raises(ValueError, match=r"reset_mask'\] must be a bool array of shape \(2,\)"):
        vec.reset(options={"reset_mask": np.array([1, 0])})
