"""Reward functions: the adapters of `as_reward_function` and the checks on what they return."""

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

from envs.builtin import SENTIMENT_REWARD, sentiment_reward
from rlhf_ray.models.tiny import EOS, UNK, VOCABULARY
from rlhf_ray.rewards import RewardError, RewardFunction, RewardModelScorer, as_reward_function, join_prompt_response

PROMPTS = ["the movie was", "the food is", "my day was"]
RESPONSES = ["great fun", "bad", "so so dull and sad"]


def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """An importable module `user_rewards` with a good and a NaN-returning reward function."""
    (tmp_path / "user_rewards.py").write_text(textwrap.dedent("""
        import math
        def good(prompts, responses):
            return [1.0] * len(responses)
        def nan_at_3(prompts, responses):
            return [math.nan if i == 3 else 0.0 for i in range(len(responses))]
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


def save_reward_model(path, tokenizer, pad_token_id):
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture
def reward_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "reward-model"
    save_reward_model(path, tiny_tokenizer, tiny_tokenizer.pad_token_id)
    return path


# ---------------------------------------------------------------------------------------- callables


@pytest.mark.parametrize("wrap", [list, np.array, torch.tensor], ids=["list", "numpy", "torch"])
def test_callable_output_becomes_float64_array_of_one_score_per_pair(wrap):
    reward = as_reward_function(lambda prompts, responses: wrap([1.0, 2.0, 3.0]))
    scores = reward(PROMPTS, RESPONSES)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (3,)
    np.testing.assert_allclose(scores, [1.0, 2.0, 3.0])


def test_callable_is_named_by_module_and_qualified_name():
    assert as_reward_function(length_reward).name == f"{__name__}:length_reward"


def test_reward_function_is_returned_unchanged():
    reward = as_reward_function(length_reward)
    assert as_reward_function(reward) is reward


def test_empty_batch_gives_empty_scores_without_calling_the_function():
    calls = []
    reward = as_reward_function(lambda p, r: calls.append(1))
    assert reward([], []).shape == (0,) and calls == []


def test_wrong_number_of_scores_is_a_reward_error_naming_the_reward():
    reward = as_reward_function(lambda p, r: [1.0], name="short")
    with pytest.raises(RewardError, match=r"reward 'short' returned scores of shape \(1,\) for 3"):
        reward(PROMPTS, RESPONSES)


def test_non_numeric_output_is_a_reward_error():
    reward = as_reward_function(lambda p, r: ["good"] * len(r), name="words")
    with pytest.raises(RewardError, match="reward 'words'.*not a sequence of numbers"):
        reward(PROMPTS, RESPONSES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_score_is_a_reward_error_naming_reward_and_item(bad):
    reward = as_reward_function(lambda p, r: [0.0, bad, 0.0], name="flaky")
    with pytest.raises(RewardError, match=rf"reward 'flaky' returned a non-finite score \({bad}\) for item 1"):
        reward(PROMPTS, RESPONSES)


def test_mismatched_prompts_and_responses_is_a_value_error():
    with pytest.raises(ValueError, match="2 prompts but 3 responses"):
        as_reward_function(length_reward)(PROMPTS[:2], RESPONSES)


def test_exception_inside_the_function_is_a_reward_error_naming_the_reward_and_the_batch():
    def broken(prompts, responses):
        raise KeyError("oops")

    with pytest.raises(RewardError, match=r"reward 'broken' raised KeyError: 'oops' \(scoring a batch of 3 ") as raised:
        as_reward_function(broken, name="broken")(PROMPTS, RESPONSES)
    assert isinstance(raised.value.__cause__, KeyError)  # the user's own exception, for the traceback log


def test_a_reward_that_does_not_return_in_time_fails_naming_the_bound_and_the_batch():
    import threading
    import time

    release = threading.Event()

    def hung(prompts, responses):
        release.wait(30)
        return [0.0] * len(prompts)

    started = time.monotonic()
    with pytest.raises(RewardError, match=r"reward 'remote' did not return within reward.timeout_s=0.2 s "
                                          r"for a batch of 3 \(prompt, response\) pairs"):
        RewardFunction(hung, "remote", timeout_s=0.2)(PROMPTS, RESPONSES)
    assert time.monotonic() - started < 10  # a hang detector, not a benchmark
    release.set()
    # within the bound, scores and errors come back as from a plain call
    assert RewardFunction(length_reward, timeout_s=5)(PROMPTS, RESPONSES).shape == (3,)
    with pytest.raises(RewardError, match="raised ZeroDivisionError"):
        RewardFunction(lambda p, r: 1 / 0, "div", timeout_s=5)(PROMPTS, RESPONSES)


# ---------------------------------------------------------------------------------------- import strings


def test_import_string_resolves_to_the_named_function(reward_module):
    reward = as_reward_function(f"{reward_module}:good")
    assert reward.name == "user_rewards:good"
    np.testing.assert_array_equal(reward(PROMPTS, RESPONSES), [1.0, 1.0, 1.0])


def test_builtin_sentiment_import_string_matches_the_function():
    reward = as_reward_function(SENTIMENT_REWARD)
    np.testing.assert_array_equal(reward(PROMPTS, RESPONSES), sentiment_reward(PROMPTS, RESPONSES))


def test_non_finite_score_from_import_string_names_it_and_the_item(reward_module):
    reward = as_reward_function(f"{reward_module}:nan_at_3")
    message = r"reward 'user_rewards:nan_at_3' returned a non-finite score \(nan\) for item 3"
    with pytest.raises(RewardError, match=message):
        reward(["p"] * 5, ["r"] * 5)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", r"reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ("user_rewards:missing", r"reward 'user_rewards:missing': module 'user_rewards' has no attribute 'missing'"),
    ("user_rewards:NOT_A_FUNCTION", r"reward 'user_rewards:NOT_A_FUNCTION' names a int, not a function"),
    ("user_rewards:", r"reward 'user_rewards:' is not an import string"),
    ("not-a-spec", r"reward 'not-a-spec' is neither an import string"),
])
def test_bad_string_spec_is_a_reward_error_naming_it(reward_module, spec, message):
    with pytest.raises(RewardError, match=message):
        as_reward_function(spec)


def test_unsupported_spec_type_is_a_reward_error():
    with pytest.raises(RewardError, match="cannot make a reward function of int 3"):
        as_reward_function(3)


# ---------------------------------------------------------------------------------------- reward models


def test_prompt_and_response_are_joined_with_one_space():
    assert join_prompt_response("the movie was", "great") == "the movie was great"
    assert join_prompt_response("the movie was", " great") == "the movie was great"
    assert join_prompt_response("the movie was ", "great") == "the movie was great"
    assert join_prompt_response("the movie was", "") == "the movie was"


def test_reward_model_scores_are_the_head_logit_at_the_last_token(reward_model_dir, tiny_tokenizer):
    scorer = RewardModelScorer(reward_model_dir, batch_size=2)
    scores = scorer(PROMPTS, RESPONSES)
    model = GPT2ForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():
        expected = [model(**tiny_tokenizer(join_prompt_response(p, r), return_tensors="pt")).logits[0, 0].item()
                    for p, r in zip(PROMPTS, RESPONSES)]
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_reward_model_folder_becomes_a_reward_function_named_by_the_folder(reward_model_dir):
    reward = as_reward_function(reward_model_dir)
    assert isinstance(reward, RewardFunction) and reward.name == str(reward_model_dir)
    scores = reward(PROMPTS, RESPONSES)
    assert scores.dtype == np.float64 and scores.shape == (3,) and np.isfinite(scores).all()


def test_reward_model_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token=UNK))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS, unk_token=UNK)
    assert tokenizer.pad_token is None
    save_reward_model(tmp_path / "rm", tokenizer, pad_token_id=None)
    scorer = RewardModelScorer(tmp_path / "rm", batch_size=8)
    batched = scorer(PROMPTS, RESPONSES)
    one_by_one = np.concatenate([scorer([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_causal_lm_folder_without_scalar_head_is_a_reward_error(tiny_model_dir):
    with pytest.raises(RewardError, match="has no trained scalar head"):
        RewardModelScorer(tiny_model_dir)


def imported_modules(module: str, seen: set[str]) -> set[str]:
    """Every module named by an import statement in `module` and, transitively, in the project modules it imports."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # `from package.module import name`: the name is no module
        return set()
    if module in seen or spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return set()
    seen.add(module)
    names = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in list(names):
        if name.split(".")[0] in ("envs", "rlhf_ray"):
            names |= imported_modules(name, seen)
    return names


def test_rewards_and_envs_import_neither_ray_nor_deepspeed():
    # statically, so that it holds whatever other tests imported into this process
    seen: set[str] = set()
    names = set()
    for root in ("envs", "envs.text_generation", "envs.vector", "envs.builtin", "rlhf_ray.rewards",
                 "rlhf_ray.rewards.base", "rlhf_ray.rewards.reward_model"):
        names |= imported_modules(root, seen)
    assert "rlhf_ray.models.loading" in seen  # the walk does follow project imports
    assert sorted(n for n in names if n.split(".")[0] in ("ray", "deepspeed")) == []
