"""The built-in toy task: continue a sentence, be rewarded for positive words.

A small stand-in for the sentiment task of Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences" (continue a movie review, be rewarded by a sentiment classifier): here the
classifier is word counting over the tiny vocabulary of `rlhf_ray.models.tiny`, so a run on a laptop
shows the reward climb within minutes and a test can work out the expected reward by hand.
"""

from __future__ import annotations

import re

import numpy as np

from rlhf_ray.models.tiny import NEGATIVE_WORDS, POSITIVE_WORDS

# Sentence openings made only of words of rlhf_ray.models.tiny.VOCABULARY (a test checks it).
BUILTIN_PROMPTS = [
    "the movie was",
    "the food was",
    "the day was",
    "the book is",
    "the music was",
    "the weather is",
    "the team was",
    "the city is",
    "my day was",
    "our team is",
    "this movie is",
    "this book was",
    "i think the food is",
    "i think the movie was",
    "i think this city is",
    "i felt",
    "today i felt",
    "today the weather is",
    "it was a",
    "it is quite",
    "the music was really",
    "my book is very",
    "our city was so",
    "a movie with all the music was",
]

SENTIMENT_REWARD = "envs.builtin:sentiment_reward"  # the import string of `sentiment_reward`, for configs

_POSITIVE, _NEGATIVE = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS)
_WORD = re.compile(r"[a-z]+")


def sentiment_score(response: str) -> float:
    """(positive words - negative words) / max(1, words) of one response; words are runs of letters, any case."""
    words = _WORD.findall(response.lower())
    balance = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    return balance / max(1, len(words))


def sentiment_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    """The toy sentiment reward of each response, in [-1, 1]; shape (n,). The prompts are not scored."""
    return np.array([sentiment_score(response) for response in responses], dtype=np.float64)


# The same score over everyday English, for a real model's text (SmolLM2 rarely writes the ten positive
# and ten negative words of the tiny vocabulary): simulated people who like upbeat text judge by it.
UPBEAT_WORDS = frozenset(POSITIVE_WORDS) | frozenset("""
    amazing awesome beautiful brilliant charming cheerful delight delightful enjoy enjoyed enjoying excellent
    excited exciting fantastic favorite favourite friendly glad gorgeous grateful incredible joy joyful
    liked lovely loved loving lucky marvelous perfect pleasant pleased positive proud relaxing smile
    smiling splendid success successful superb sweet terrific thank thanks thrilled warm win won wow
    calm hope hopeful inspiring interesting sunny beautifully peaceful fresh glorious""".split())
DOWNBEAT_WORDS = frozenset(NEGATIVE_WORDS) | frozenset("""
    annoying annoyed ashamed afraid broken cry crying dark depressing depressed difficult disappointed
    disappointing disaster dislike dreadful fail failed failure fear gloomy grim hated horrible hurt
    lonely lose lost mess miserable nasty negative pain painful problem scary sick sorry stupid
    terrible tired trouble ugly unfortunately unhappy upset waste wasted weak worried worse wrong""".split())


def upbeat_score(response: str) -> float:
    """(upbeat words - downbeat words) / max(1, words) of one response, over the word lists above."""
    words = _WORD.findall(response.lower())
    return (sum(w in UPBEAT_WORDS for w in words) - sum(w in DOWNBEAT_WORDS for w in words)) / max(1, len(words))


def upbeat_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    """`upbeat_score` of each response, in [-1, 1]; shape (n,). The prompts are not scored."""
    return np.array([upbeat_score(response) for response in responses], dtype=np.float64)
