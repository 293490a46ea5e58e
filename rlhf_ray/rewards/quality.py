"""Text-quality scores Q for a composite reward: length, repetition, format. Each is a reward function
`fn(prompts, responses, **kwargs) -> scores`, configured with `kwargs` in YAML:

    quality: {function: rlhf_ray.rewards.quality:length_score, kwargs: {target: 20}}

Words are whitespace-separated tokens, so the scores do not depend on the policy's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def length_score(prompts: Sequence[str], responses: Sequence[str], target: int = 20,
                 tolerance: int = 0) -> np.ndarray:
    """1 within `tolerance` words of `target`, falling by 1/target per further word, down to -1.

    target=20, tolerance=5: 20 words -> 1.0, 25 -> 1.0, 30 -> 0.75, 0 -> 0.25, 90 -> -1.0.
    """
    if target < 1 or tolerance < 0:
        raise ValueError(f"length_score needs target >= 1 and tolerance >= 0, got {target}, {tolerance}")
    words = np.array([len(r.split()) for r in responses], dtype=np.float64)
    excess = np.maximum(np.abs(words - target) - tolerance, 0.0)
    return np.clip(1.0 - excess / target, -1.0, 1.0)


def distinct_ngrams(text: str, n: int) -> float:
    """The share of a text's word n-grams that are distinct (Li et al. 2016 "distinct-n"); 1.0 when it has none."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_score(prompts: Sequence[str], responses: Sequence[str], n: int = 3) -> np.ndarray:
    """distinct-n of each response minus 1: 0 without a repeated n-gram, towards -1 as it loops."""
    if n < 1:
        raise ValueError(f"repetition_score needs n >= 1, got {n}")
    return np.array([distinct_ngrams(r, n) - 1.0 for r in responses], dtype=np.float64)


def format_score(prompts: Sequence[str], responses: Sequence[str], pattern: str = r"[.!?][\"')\]]*\s*$",
                 match: float = 1.0, miss: float = 0.0) -> np.ndarray:
    """`match` where the regex `pattern` is found in the response (default: it ends a sentence), else `miss`."""
    regex = re.compile(pattern)
    return np.array([match if regex.search(r) else miss for r in responses], dtype=np.float64)
