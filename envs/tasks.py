"""Verifiable tasks for a small instruct model: a prompt says what to do, a short function checks it.

A real model should get measurably better from RL on a laptop CPU (SmolLM2-135M-Instruct, groups of
4 samples, a few hundred updates). That needs tasks whose score is computed, not judged, so a test
can work it out by hand; where the base model is neither hopeless nor done (a held-out score of
about 0.1-0.5); and where the score has steps between 0 and 1, so that the samples of one prompt
differ and a group baseline (GRPO) has something to push on. The tasks ask for what such a model can
already do, in the form the prompt asks for:

- `addition`: "What is 14 + 7? Answer with the number only." 1 when the answer's last number is the sum,
  bare or in a longer answer ("14 + 7 = 21", the base model's usual form), else 0. The score checks the
  sum, not the form: the first scorer gave 0.5 for a longer answer, and a 135M model never samples the bare
  correct sum (0 of 256 samples at temperature 0.7: its bare numbers are all wrong), so a 40-iteration run
  learned correct sums (12 -> 28 of 32) in the one form it had and stopped at the 0.5 ceiling.
- `word_count`: "Write one sentence about the sea in exactly 7 words." min(words, n) / max(words, n),
  and 0 when the sentence does not name its topic or echoes the instruction (a 30-minute GRPO run with
  no KL term learned "A park in exactly 10 words: park", which the first version of the scorer rewarded).
- `start_word`: 'Start your answer with the word "Honestly". Do cats like water?' 1 / the position of the
  word among the answer's words (0 without it), halved for the word alone.

Two tasks were tried and left out: reversing four words (the base model scored 0.06: it drops and repeats
words, too far from right for a few hundred updates) and a JSON object of a described person (0.95 greedy:
nothing left to learn).

Every task has a prompt generator, deterministic from its random generator (`experiments/data/
make_data.py` writes the train and held-out files with them), and a reward with the project's
signature, `<task>_reward(prompts, responses) -> scores` in [0, 1], so a config names only
`envs.tasks:<task>_reward`. A scorer reads the task's parameters (numbers, topic, word) from the
prompt. The prompt a reward receives is decoded from the policy's prompt tokens: for a chat model, the
whole chat template around the user's words (`<|im_start|>system ... <|im_start|>user\\n...<|im_end|>
\\n<|im_start|>assistant\\n`), so each scorer looks for its task's sentence anywhere in the prompt (the
last one, the user's). A prompt without it is an error (the reward is pointed at another task's data),
not a score of 0; this is also why the tiny word-level models cannot run these tasks, whose decoded
prompts are mostly <unk>.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[a-z]+")


def _task_match(pattern: re.Pattern, prompt: str, task: str) -> re.Match:
    """The last match of the task's sentence in `prompt` (the user's turn follows any system text)."""
    matches = list(pattern.finditer(prompt))
    if not matches:
        raise ValueError(f"not a {task} prompt (no match of {pattern.pattern!r}): {prompt!r:.300}")
    return matches[-1]


def _batch(score: Callable[[str, str], float], prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return np.array([score(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


# ---------------------------------------------------------------- addition

_ADDITION = re.compile(r"What is (\d+) \+ (\d+)\? Answer with the number only\.")


def addition_prompt(rng: random.Random) -> str:
    """A number of 1-20 and one of 1-9, in either order: small enough that the base model gets most sums right
    inside "a + b = c" (with two-digit numbers it gets most wrong, and RL would have arithmetic to learn)."""
    a, b = rng.randint(1, 20), rng.randint(1, 9)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return f"What is {a} + {b}? Answer with the number only."


def addition_score(prompt: str, response: str) -> float:
    """1 when the response's last number is the sum ("21", "14 + 7 = 21", "The answer is 21."), else 0."""
    a, b = map(int, _task_match(_ADDITION, prompt, "addition").groups())
    numbers = _NUMBER.findall(response)
    return 1.0 if numbers and numbers[-1] == str(a + b) else 0.0


def addition_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    return _batch(addition_score, prompts, responses)


# ---------------------------------------------------------------- word_count

# Everyday topics, each one singular word the sentence must contain (a plural or other ending is fine).
WORD_COUNT_TOPICS = [
    "the sea", "coffee", "rain", "a dog", "a cat", "music", "winter", "summer", "the moon", "bread", "a garden",
    "a city", "a tree", "a book", "the sun", "friendship", "a river", "snow", "tea", "a bicycle", "a mountain",
    "a train", "the night", "a flower", "a school", "a bird", "the wind", "a forest", "chocolate", "a storm",
    "the morning", "a beach", "a kitchen", "a library", "football", "a lake", "autumn", "a horse", "an apple",
    "a bridge", "a baby", "a candle", "the ocean", "a farm", "a teacher", "a song", "a road", "the market",
    "a village", "a painting", "soup", "a window", "a holiday", "a star", "a park", "a boat", "a clock",
    "a letter", "a game", "a picnic",
]
_WORD_COUNT = re.compile(r"Write one sentence about (?:the |a |an )?([a-z]+) in exactly (\d+) words\.")


def word_count_prompt(rng: random.Random) -> str:
    """5-10 words: the base model's sentences run from a few words to past the budget (a score of about 0.4)."""
    return f"Write one sentence about {rng.choice(WORD_COUNT_TOPICS)} in exactly {rng.randint(5, 10)} words."


def count_words(text: str) -> int:
    """Whitespace-separated pieces with a letter or digit in them (a lone dash is not a word)."""
    return sum(any(c.isalnum() for c in piece) for piece in text.split())


_ECHO = re.compile(r"\d|\bexactly\b|\bwords?\b|\bsentences?\b")  # the instruction's own words, or a count


def word_count_score(prompt: str, response: str) -> float:
    """min(words, n) / max(words, n): 1 at exactly n, 7 words for 8 -> 0.875, 16 for 8 -> 0.5; 0 when the
    response does not contain the topic's word (as the start of a word: "dogs" names "dog"), or talks about
    the instruction instead of the topic (a digit, "exactly", "word(s)", "sentence(s)")."""
    topic, n = _task_match(_WORD_COUNT, prompt, "word_count").groups()
    n, words = int(n), count_words(response)
    text = response.lower()
    if not words or not re.search(rf"\b{topic}", text) or _ECHO.search(text):
        return 0.0
    return min(words, n) / max(words, n)


def word_count_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    return _batch(word_count_score, prompts, responses)


# ---------------------------------------------------------------- start_word

START_WORDS = ["Sure", "Yes", "Well", "Today", "Honestly", "First", "Actually", "Indeed", "Usually", "Maybe",
               "Certainly", "Interestingly", "Basically", "Luckily", "Clearly", "Generally", "Often", "Perhaps",
               "Friends", "Listen"]
# Everyday questions, written for this project.
START_QUESTIONS = [
    "What is a good breakfast?", "Is the sun a star?", "Why is the sky blue?", "What should I cook for dinner?",
    "Do cats like water?", "How do I plant a tree?", "Why do leaves change color in autumn?",
    "How can I sleep better?", "What is a good name for a dog?", "Why do people like music?",
    "How do I make tea?", "What should I pack for a beach trip?", "Is it healthy to walk every day?",
    "How do birds fly?", "What makes a good friend?", "How do I keep my room tidy?", "Why does it rain?",
    "What is the best way to learn a new word?", "How can I save water at home?", "Why do we need sleep?",
    "What can I do on a rainy day?", "How do I start reading more books?", "Why is exercise good for you?",
    "What fruit is good in winter?", "How do bees make honey?", "What is a fun game for children?",
    "How do I write a short letter?", "Why do cats purr?", "How can I be on time more often?",
    "What should I plant in a small garden?",
]
_START_WORD = re.compile(r'Start your answer with the word "([A-Za-z]+)"\. ')


def start_word_prompt(rng: random.Random) -> str:
    return f'Start your answer with the word "{rng.choice(START_WORDS)}". {rng.choice(START_QUESTIONS)}'


def start_word_score(prompt: str, response: str) -> float:
    """1 / the position of the word's first use among the response's words ("Sure, ..." -> 1, "Yes, sure" -> 0.5,
    never -> 0), halved when the response is the word alone and answers nothing."""
    word = _task_match(_START_WORD, prompt, "start_word").group(1).lower()
    words = _WORD.findall(response.lower())
    if word not in words:
        return 0.0
    return 1.0 / (words.index(word) + 1) * (0.5 if len(words) == 1 else 1.0)


def start_word_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    return _batch(start_word_score, prompts, responses)


# ---------------------------------------------------------------- the suite


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[random.Random], str]  # one prompt, drawn with the generator given
    score: Callable[[str, str], float]  # (prompt, response) -> [0, 1]

    def prompts(self, count: int, seed: int) -> list[str]:
        """`count` different prompts, the same for the same seed."""
        rng, drawn = random.Random(seed), {}
        for _ in range(100 * count):
            drawn.setdefault(self.prompt(rng), None)
            if len(drawn) == count:
                return list(drawn)
        raise ValueError(f"task {self.name!r} drew only {len(drawn)} different prompts in {100 * count} tries, "
                         f"fewer than the {count} asked for")


TASKS = {task.name: task for task in [
    Task("addition", addition_prompt, addition_score),
    Task("word_count", word_count_prompt, word_count_score),
    Task("start_word", start_word_prompt, start_word_score),
]}
