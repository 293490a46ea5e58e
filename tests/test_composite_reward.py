"""Composite rewards R = sum of weighted components and the text-quality scores, with hand-worked numbers."""

import json

import numpy as np
import pytest

from rlhf_ray.config import ConfigError, RewardConfig, load_config
from rlhf_ray.rewards import RewardError, RewardModelScorer
from rlhf_ray.rewards.composite import CompositeReward, build_reward
from rlhf_ray.rewards.quality import distinct_ngrams, format_score, length_score, repetition_score
from rlhf_ray.rollout.sampler import Sampler, SamplingParams
from tests.test_rewards import save_reward_model


def words(n):
    return " ".join(["w"] * n)


def test_length_score_by_hand():
    # target 20, tolerance 5: within 15..25 -> 1; 30 words: 5 beyond -> 1 - 5/20; 0 words: 15 beyond -> 0.25
    scores = length_score(["p"] * 5, [words(20), words(25), words(30), "", words(90)], target=20, tolerance=5)
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.75, 0.25, -1.0])


def test_repetition_and_format_scores_by_hand():
    assert distinct_ngrams("a b a b a", 2) == pytest.approx(2 / 4)  # ab ba ab ba: 2 distinct of 4
    np.testing.assert_allclose(repetition_score(["p", "p"], ["a b c d", "a b a b a"], n=2), [0.0, -0.5])
    np.testing.assert_allclose(format_score(["p"] * 3, ["Done.", "Really?\"", "no end"]), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(format_score(["p"] * 2, ["x 42", "x"], pattern=r"\d", match=2.0, miss=-1.0), [2.0, -1.0])


def test_composite_is_the_weighted_sum_and_returns_each_component():
    reward = build_reward(RewardConfig(components={
        "quality": {"function": "rlhf_ray.rewards.quality:length_score", "kwargs": {"target": 4}, "weight": 0.5},
        "sentiment": {"function": "envs.builtin:sentiment_reward", "weight": 2.0},
    }))
    prompts, responses = ["a", "b"], ["good day fun", "bad bad bad bad bad bad"]
    # length 3 of target 4 -> 0.75, 6 of 4 -> 0.5; sentiment: 2 positive of 3 words -> 2/3, 6 negative of 6 -> -1
    np.testing.assert_allclose(reward(prompts, responses), [0.5 * 0.75 + 2 * 2 / 3, 0.5 * 0.5 + 2 * -1.0])
    scored = reward.score(prompts, responses)
    np.testing.assert_allclose(scored.total, [0.5 * 0.75 + 2 * 2 / 3, 0.5 * 0.5 + 2 * -1.0])
    assert scored.per_item() == [pytest.approx({"quality": 0.75, "sentiment": 2 / 3}),
                                 pytest.approx({"quality": 0.5, "sentiment": -1.0})]
    assert build_reward(RewardConfig()).score(prompts, responses).per_item() is None  # not a composite


def test_sampler_attaches_components_to_episodes(tiny_model_dir):
    from rlhf_ray.models import load_policy

    model, tokenizer = load_policy(tiny_model_dir)
    reward = build_reward({"components": {
        "length": {"function": "rlhf_ray.rewards.quality:length_score", "kwargs": {"target": 3}, "weight": 1.0},
        "sentiment": {"function": "envs.builtin:sentiment_reward", "weight": 0.5}}})
    sampler = Sampler(model, tokenizer, reward, SamplingParams(max_new_tokens=6))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["today the movie was", "my day was"]]
    for episode in sampler.generate(prompts, seeds=[1, 2]):
        parts = episode.reward_components
        assert episode.reward == pytest.approx(parts["length"] + 0.5 * parts["sentiment"])
        assert parts["length"] == pytest.approx(length_score([""], [episode.response], target=3)[0])


def test_reward_model_component_is_normalised_by_its_saved_statistics(tmp_path, tiny_tokenizer):
    save_reward_model(tmp_path / "rm", tiny_tokenizer, tiny_tokenizer.pad_token_id)
    raw = RewardModelScorer(tmp_path / "rm")(["the day"] * 2, ["was good", "was bad"])
    (tmp_path / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0}))
    reward = build_reward({"components": {"human": {"model": "{run}/rm", "weight": 3.0}}}, run_dir=str(tmp_path))
    np.testing.assert_allclose(reward(["the day"] * 2, ["was good", "was bad"]), 3.0 * (raw - 0.25) / 2.0, rtol=1e-5)
    plain = build_reward({"components": {"human": {"model": str(tmp_path / "rm"), "normalize": False}}})
    np.testing.assert_allclose(plain(["the day"] * 2, ["was good", "was bad"]), raw, rtol=1e-6)


def test_missing_reward_model_folder_names_the_stage_that_makes_it(tmp_path):
    with pytest.raises(RewardError, match="reward_model stage"):
        build_reward({"components": {"human": {"model": "{run}/reward_model"}}}, run_dir=str(tmp_path))
    with pytest.raises(RewardError, match="at least one component"):
        CompositeReward({}, {})


@pytest.mark.parametrize("override, message", [
    ('reward.components={q: {function: "a:b", model: x}}', "exactly one of 'function' and 'model'"),
    ('reward.components={q: {model: x, kwargs: {a: 1}}}', "'kwargs' applies to a 'function' component only"),
    ('reward.components={q: {function: "a:b", weight: heavy}}', "reward.components.q.weight"),
    ("reward.components={}", "reward.components is empty"),
])
def test_reward_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("experiments/quickstart.yaml", [override])


def test_function_and_components_are_exclusive():
    with pytest.raises(ConfigError, match="set reward.function or reward.components, not both"):
        load_config("experiments/quickstart.yaml", ['reward.components={q: {function: "a:b"}}'])
    config = load_config("experiments/quickstart.yaml", ["reward.function=null", 'reward.components={q: {function: "a:b"}}'])
    assert config.reward.function is None and config.reward.components["q"].weight == 1.0
