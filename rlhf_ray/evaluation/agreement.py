"""The statistics of a blind human evaluation: a win rate with ties counted 1/2, its Wilson score interval,
and Cohen's kappa between two annotators who labelled the same items.

An item's outcome for the policy is "win", "loss" or "tie"; the win rate counts a tie as half a win, as
`rlhf-ray eval` counts the judge's ties, and the ties are reported on their own as well.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

OUTCOMES = ("win", "loss", "tie")
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    rate: float  # (wins + ties / 2) / items
    low: float  # the 95 % Wilson score interval of `rate`
    high: float

    @property
    def items(self) -> int:
        return self.wins + self.losses + self.ties


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (Wilson 1927). It stays inside [0, 1] and
    keeps a width at 0 or n successes, unlike the normal approximation; `successes` may count halves."""
    if n <= 0:
        raise ValueError(f"a proportion needs at least one item, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, n={n}], got {successes}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(outcomes: Sequence[str]) -> WinRate:
    """The policy's win rate over items whose outcomes are "win", "loss" or "tie"."""
    unknown = sorted(set(outcomes) - set(OUTCOMES))
    if unknown:
        raise ValueError(f"an outcome is one of {OUTCOMES}, got {unknown}")
    counts = Counter(outcomes)
    n = len(outcomes)
    score = counts["win"] + counts["tie"] / 2
    low, high = wilson_interval(score, n)
    return WinRate(counts["win"], counts["loss"], counts["tie"], score / n, low, high)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two annotators' labels of the same items, in the same order: (p_o - p_e) / (1 - p_e),
    p_o their agreement and p_e the agreement expected by chance from each one's label frequencies. None when
    p_e is 1 (both gave one and the same label to every item: chance explains all agreement)."""
    if len(first) != len(second):
        raise ValueError(f"kappa compares labels of the same items: got {len(first)} and {len(second)}")
    if not first:
        raise ValueError("kappa needs at least one item labelled by both annotators")
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    counts_a, counts_b = Counter(first), Counter(second)
    expected = sum(counts_a[label] * counts_b[label] for label in counts_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)
