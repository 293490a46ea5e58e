"""A user's reward functions, broken in the ways users break them (tests/test_fail_fast.py).

Rollout workers import this module by name (`user_code:...`), so the tests put this folder on the
workers' PYTHONPATH.
"""

import os
import time

from envs.builtin import sentiment_reward

MARKER = "cold"  # a prompt ending in it makes `fails_on_marker` raise, unless FIXED_ENV is "1" (a word the
# tiny tokenizer knows, so it survives the round trip through token ids; no built-in prompt ends in it)
FIXED_ENV = "USER_CODE_FIXED"


def fails_on_marker(prompts, responses):
    """Scores like the toy reward, until a batch holds a marked prompt: a reward that fails on iteration k."""
    if os.environ.get(FIXED_ENV) != "1" and any(p.split()[-1:] == [MARKER] for p in prompts):
        raise ValueError("the scoring service rejected the request (HTTP 422)")
    return sentiment_reward(prompts, responses)


def by_last_word(prompts, responses):
    """Misbehaves as the last word of a prompt says: "cold" raises, "angry" hangs, "dull" is slow."""
    last = {p.split()[-1] for p in prompts if p.split()}
    if "cold" in last:
        raise ValueError("the scoring service rejected the request (HTTP 422)")
    if "angry" in last:
        return hangs(prompts, responses)
    if "dull" in last:
        return slow(prompts, responses)
    return sentiment_reward(prompts, responses)


def raises(prompts, responses):
    return {"score": 1.0}["quality"]


def returns_nan(prompts, responses):
    return [float("nan")] * len(prompts)


def one_too_few(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def hangs(prompts, responses):
    """A remote reward service that never answers."""
    time.sleep(3600)
    return [0.0] * len(prompts)


def slow(prompts, responses):
    """Answers, after a while (a busy service)."""
    time.sleep(float(os.environ.get("USER_CODE_SLOW_S", "20")))
    return [0.0] * len(prompts)


class RaisingUser:
    """A multi-turn task's user whose reply raises (tests/test_dialogue.py)."""

    def reply(self, prompt, turns):
        return {"order": "427"}["number"]


class WrongReply:
    """A multi-turn task's user that answers with a bare string instead of a Reply."""

    def reply(self, prompt, turns):
        return "it is 427"
