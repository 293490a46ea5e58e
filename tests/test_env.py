"""The single text-generation environment and the built-in toy task."""

import importlib
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import BUILTIN_PROMPTS, ENV_ID, SENTIMENT_REWARD, NO_PROMPT, TextGenerationEnv, sentiment_reward
from rlhf_ray.models.tiny import NEGATIVE_WORDS, POSITIVE_WORDS, VOCABULARY
from rlhf_ray.rewards import RewardError, as_reward_function

EOS = 1


def word_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_episode(env, actions, **reset_options):
    """Reset with `reset_options`, step `actions` until the episode ends; the list of step results."""
    env.reset(seed=0, options=reset_options or None)
    results = []
    for action in actions:
        results.append(env.step(action))
        if results[-1][2] or results[-1][3]:
            break
    return results


# ---------------------------------------------------------------------------------------- toy task


def test_builtin_prompts_use_only_the_tiny_vocabulary():
    assert len(BUILTIN_PROMPTS) >= 20 and len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
    assert {w for p in BUILTIN_PROMPTS for w in p.split()} <= set(VOCABULARY)


def test_sentiment_reward_is_positive_minus_negative_words_over_words():
    responses = ["great fun", "bad day", "the good the bad the boring", "", "Great, GOOD!"]
    np.testing.assert_allclose(sentiment_reward([""] * 5, responses), [1.0, -0.5, -1 / 6, 0.0, 1.0])


def test_upbeat_reward_counts_everyday_words_as_the_sentiment_reward_counts_the_tiny_ones():
    from envs.builtin import upbeat_reward

    # "Lovely," and "thanks!" are upbeat, "sorry" downbeat; 7 words: (2 - 1) / 7
    scores = upbeat_reward(["p"] * 3, ["Lovely, I'm sorry it rained, thanks!", "", "The GREAT day was good"])
    np.testing.assert_allclose(scores, [1 / 7, 0.0, 2 / 5])


def test_sentiment_reward_import_string_names_the_function():
    assert as_reward_function(SENTIMENT_REWARD).fn is sentiment_reward


# ---------------------------------------------------------------------------------------- registration


def test_check_env_passes_without_warnings_on_the_registered_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(ENV_ID).unwrapped)  # with a spec, the checker also tries the "ansi" render mode


def test_check_env_passes_on_a_directly_built_env():
    check_env(TextGenerationEnv(prompts=["the day was", "i felt"], max_new_tokens=3), skip_render_check=True)


def test_gymnasium_make_builds_the_builtin_task_without_arguments():
    env = gym.make(ENV_ID)
    assert isinstance(env.unwrapped, TextGenerationEnv)
    assert env.unwrapped.prompts == tuple(BUILTIN_PROMPTS) and env.unwrapped.max_new_tokens == 16
    assert env.reset(seed=0)[0] in env.observation_space


def test_gymnasium_make_passes_kwargs_to_the_env(tiny_model_dir):
    env = gym.make(ENV_ID, tokenizer=str(tiny_model_dir), prompts=["the day was"], max_new_tokens=3,
                   reward_fn=SENTIMENT_REWARD)
    observation, _ = env.reset(seed=0)
    assert env.unwrapped.max_length == 3 + 3 and observation["input_ids"].shape == (6,)
    assert env.unwrapped.reward_fn.name == SENTIMENT_REWARD


def test_registration_is_idempotent():
    importlib.reload(envs)
    assert gym.spec(ENV_ID).vector_entry_point == "envs.vector:TextGenerationVectorEnv"


# ---------------------------------------------------------------------------------------- construction


def test_default_max_length_is_longest_prompt_plus_max_new_tokens():
    env = TextGenerationEnv(prompts=["the day", "i think the movie was"], max_new_tokens=4)
    assert env.max_length == 5 + 4
    assert env.observation_space["input_ids"].shape == (9,)


def test_action_space_is_the_vocabulary():
    assert TextGenerationEnv().action_space == gym.spaces.Discrete(len(VOCABULARY))


def test_prompt_that_leaves_no_room_under_max_length_is_a_value_error_naming_its_index():
    with pytest.raises(ValueError, match=r"prompt 1 \('i think the movie was'\) has 5 tokens.*max_length=5"):
        TextGenerationEnv(prompts=["the day", "i think the movie was"], max_length=5)


def test_empty_prompt_list_is_a_value_error():
    with pytest.raises(ValueError, match="prompts is empty"):
        TextGenerationEnv(prompts=[])


def test_prompts_are_tokenized_once_at_construction(tiny_tokenizer):
    calls = []

    class CountingTokenizer(type(tiny_tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return super().__call__(*args, **kwargs)

    tokenizer = CountingTokenizer(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<pad>",
                                  eos_token="<eos>", unk_token="<unk>")
    env = TextGenerationEnv(tokenizer=tokenizer, max_new_tokens=4)
    assert len(calls) == 1
    for seed in range(3):
        run_episode(env, [5, 6, 7, 8], prompt_index=seed)
        run_episode(env, [5, 6, 7, 8], prompt=BUILTIN_PROMPTS[seed])
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------- reset


def test_reset_observation_is_the_prompt_right_padded(tiny_tokenizer):
    env = TextGenerationEnv(prompts=["the movie was", "i felt"], max_new_tokens=4)
    observation, info = env.reset(options={"prompt_index": 1})
    assert observation in env.observation_space
    assert observation["input_ids"].dtype == np.int64 and observation["input_ids"].shape == (7,)
    np.testing.assert_array_equal(observation["input_ids"], word_ids(tiny_tokenizer, "i felt") + [0] * 5)
    assert observation["length"] == observation["prompt_length"] == 2 and observation["length"].dtype == np.int64
    assert info == {"prompt_index": 1}


def test_reset_with_the_same_seed_draws_the_same_prompt():
    env = TextGenerationEnv()
    drawn = [env.reset(seed=7)[1]["prompt_index"] for _ in range(2)]
    assert drawn[0] == drawn[1]
    assert len({env.reset(seed=seed)[1]["prompt_index"] for seed in range(20)}) > 1


def test_reset_with_a_prompt_text_outside_the_list_tokenizes_it(tiny_tokenizer):
    env = TextGenerationEnv(max_new_tokens=1)
    observation, info = env.reset(options={"prompt": "the book was"})
    assert "the book was" not in BUILTIN_PROMPTS and info["prompt_index"] == NO_PROMPT
    np.testing.assert_array_equal(observation["input_ids"][:3], word_ids(tiny_tokenizer, "the book was"))
    assert env.step(5)[4]["prompt"] == "the book was"


def test_reset_with_a_prompt_text_from_the_list_reports_its_index():
    _, info = TextGenerationEnv().reset(options={"prompt": BUILTIN_PROMPTS[5]})
    assert info["prompt_index"] == 5


def test_reset_with_prompt_ids_decodes_the_prompt_at_the_end(tiny_tokenizer):
    env = TextGenerationEnv(max_new_tokens=1)
    env.reset(options={"prompt_ids": word_ids(tiny_tokenizer, "today i felt")})
    *_, info = env.step(5)
    assert info["prompt"] == "today i felt" and info["prompt_index"] == NO_PROMPT


@pytest.mark.parametrize("options, message", [
    ({"prompt_indices": [0]}, "unknown reset options"),
    ({"prompt": "the day", "prompt_index": 0}, "both choose the prompt"),
    ({"prompt_index": 999}, r"options\['prompt_index'\] is 999; expected an integer in \[0, 24\)"),
])
def test_bad_reset_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TextGenerationEnv().reset(options=options)


# ---------------------------------------------------------------------------------------- step


def test_episode_terminates_at_eos():
    results = run_episode(TextGenerationEnv(max_new_tokens=8), [5, 6, EOS, 7], prompt_index=0)
    observation, _, terminated, truncated, info = results[-1]
    assert len(results) == 3 and terminated and not truncated
    assert info["response_length"] == 3 and observation["length"] == observation["prompt_length"] + 3


def test_episode_truncates_at_max_new_tokens():
    results = run_episode(TextGenerationEnv(max_new_tokens=3), [5] * 10, prompt_index=0)
    assert len(results) == 3 and results[-1][3] and not results[-1][2]
    assert [r[3] for r in results] == [False, False, True]


def test_episode_truncates_at_max_length():
    env = TextGenerationEnv(prompts=["the movie was"], max_new_tokens=10, max_length=5)
    results = run_episode(env, [5] * 10)
    assert len(results) == 2 and results[-1][3] and results[-1][0]["length"] == 5


def test_eos_that_uses_up_the_budget_counts_as_terminated_only():
    results = run_episode(TextGenerationEnv(max_new_tokens=2), [5, EOS], prompt_index=0)
    assert results[-1][2] is True and results[-1][3] is False


def test_reward_is_zero_per_token_and_the_sentiment_of_the_response_at_the_end(tiny_tokenizer):
    env = TextGenerationEnv(max_new_tokens=8)
    actions = word_ids(tiny_tokenizer, "so great and fun but sad") + [EOS]
    results = run_episode(env, actions, prompt_index=0)
    rewards = [r[1] for r in results]
    assert rewards[:-1] == [0.0] * (len(actions) - 1)
    assert rewards[-1] == pytest.approx((2 - 1) / 6)
    assert rewards[-1] == sentiment_reward([BUILTIN_PROMPTS[0]], ["so great and fun but sad"])[0]


def test_final_info_carries_prompt_response_index_and_length(tiny_tokenizer):
    env = TextGenerationEnv(max_new_tokens=8)
    results = run_episode(env, word_ids(tiny_tokenizer, "very good") + [EOS], prompt_index=3)
    assert [r[4] for r in results[:-1]] == [{}, {}]
    assert results[-1][4] == {"prompt": BUILTIN_PROMPTS[3], "response": "very good", "prompt_index": 3,
                              "response_length": 3}


def test_observation_appends_each_action(tiny_tokenizer):
    env = TextGenerationEnv(prompts=["the day was"], max_new_tokens=4)
    env.reset(seed=0)
    observation, *_ = env.step(40)
    np.testing.assert_array_equal(observation["input_ids"], word_ids(tiny_tokenizer, "the day was") + [40, 0, 0, 0])
    assert observation["length"] == 4 and observation["prompt_length"] == 3


@pytest.mark.parametrize("action", [-1, len(VOCABULARY), 1.5, "the", np.array([3, 4])])
def test_invalid_action_is_a_value_error(action):
    env = TextGenerationEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"expected an integer in \[0, {len(VOCABULARY)}\)|one integer token id"):
        env.step(action)


def test_step_after_the_episode_ended_is_an_error():
    env = TextGenerationEnv()
    run_episode(env, [EOS])
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(5)


def test_tokenizer_from_a_model_folder(tiny_model_dir):
    env = TextGenerationEnv(tokenizer=str(tiny_model_dir), max_new_tokens=2)
    assert env.action_space.n == len(VOCABULARY)
    assert run_episode(env, [40, 41], prompt_index=0)[-1][4]["response"] == f"{VOCABULARY[40]} {VOCABULARY[41]}"


def test_non_finite_reward_is_a_reward_error_naming_the_reward():
    env = TextGenerationEnv(reward_fn=as_reward_function(lambda p, r: [float("nan")], name="nan-reward"))
    with pytest.raises(RewardError, match=r"reward 'nan-reward' returned a non-finite score \(nan\) for item 0"):
        run_episode(env, [EOS])


def test_positive_and_negative_words_are_in_the_vocabulary():
    assert set(POSITIVE_WORDS) | set(NEGATIVE_WORDS) <= set(VOCABULARY)
