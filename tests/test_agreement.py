"""The blind-evaluation statistics (rlhf_ray/evaluation/agreement.py) against numbers worked out by hand."""

import pytest

from rlhf_ray.evaluation.agreement import cohen_kappa, wilson_interval, win_rate


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.96: centre (0.7 + 1.9208/10) / 1.38416 = 0.644491,
    # half 1.96 / 1.38416 * sqrt(0.021 + 3.8416/400) = 0.247719
    low, high = wilson_interval(7, 10, z=1.96)
    assert low == pytest.approx(0.396772, abs=1e-5) and high == pytest.approx(0.892210, abs=1e-5)
    # 0 of 5 keeps a width: centre (3.8416 / 10) / 1.76832 = 0.217246, half 1.96 / 1.76832 * sqrt(3.8416 / 100)
    # = 0.217246 as well
    low, high = wilson_interval(0, 5, z=1.96)
    assert low == 0.0 and high == pytest.approx(0.434491, abs=1e-5)
    with pytest.raises(ValueError, match="at least one item"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="within"):
        wilson_interval(6, 5)


def test_win_rate_counts_a_tie_as_half_and_reports_ties():
    result = win_rate(["win"] * 5 + ["loss"] * 3 + ["tie"] * 2)
    assert (result.wins, result.losses, result.ties, result.items) == (5, 3, 2, 10)
    assert result.rate == pytest.approx(0.6)  # (5 + 2/2) / 10
    assert (result.low, result.high) == pytest.approx(wilson_interval(6, 10))
    with pytest.raises(ValueError, match="outcome is one of"):
        win_rate(["win", "draw"])


def test_cohen_kappa_by_hand():
    first = ["A", "A", "A", "B", "B", "tie", "A", "B", "A", "A"]
    second = ["A", "A", "B", "B", "B", "tie", "A", "A", "A", "tie"]
    # agree on 7 of 10; by chance: A 0.6 x 0.5 + B 0.3 x 0.3 + tie 0.1 x 0.2 = 0.41; (0.7 - 0.41) / 0.59
    assert cohen_kappa(first, second) == pytest.approx(0.29 / 0.59)
    assert cohen_kappa(first, first) == pytest.approx(1.0)
    # always opposite on two balanced labels: p_o 0, p_e 0.5 -> -1
    assert cohen_kappa(["A", "B", "A", "B"], ["B", "A", "B", "A"]) == pytest.approx(-1.0)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None  # chance explains everything
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["A"], ["A", "B"])
