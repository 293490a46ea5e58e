"""Masked reductions and whitening, against numbers worked out by hand."""

import subprocess
import sys
import threading

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algorithms import masked_mean, masked_mean_var, masked_sum, masked_var, masked_whiten

NAN, INF = float("nan"), float("inf")

# Two responses of 4 tokens; the 5th column is padding. Unmasked cells: 2, 4, 4, 4, 5, 5, 7, 9.
# mean = 40 / 8 = 5
# squared deviations: 9, 1, 1, 1, 0, 0, 4, 16 -> sum 32
# biased var = 32 / 8 = 4 (std 2); unbiased var = 32 / 7
X = torch.tensor([[2.0, 4.0, 4.0, 4.0, NAN], [5.0, 5.0, 7.0, 9.0, INF]])
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])


def test_masked_sum_and_mean_ignore_padding_even_nan_and_inf():
    assert_close(masked_sum(X, MASK), torch.tensor(40.0))
    assert_close(masked_mean(X, MASK), torch.tensor(5.0))


def test_masked_mean_per_row():
    # row 0: (2 + 4 + 4 + 4) / 4 = 3.5; row 1: (5 + 5 + 7 + 9) / 4 = 6.5
    assert_close(masked_mean(X, MASK, dim=1), torch.tensor([3.5, 6.5]))
    # per-row sums with a ragged mask: row 0 keeps 2 + 4, row 1 keeps 5
    ragged = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert_close(masked_sum(X, ragged, dim=1), torch.tensor([6.0, 5.0]))
    assert_close(masked_mean(X, ragged, dim=1), torch.tensor([3.0, 5.0]))


def test_masked_var_biased_and_unbiased():
    assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(4.0))
    assert_close(masked_var(X, MASK, unbiased=True), torch.tensor(32.0 / 7.0))
    mean, var = masked_mean_var(X, MASK, unbiased=False)
    assert_close((mean, var), (torch.tensor(5.0), torch.tensor(4.0)))


def test_masked_var_unbiased_needs_two_cells():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        masked_mean(X, MASK[:, :4])


def test_masked_whiten_shifts_and_scales_and_zeroes_padding():
    # (x - 5) / 2 with the biased std 2
    expected = torch.tensor([[-1.5, -0.5, -0.5, -0.5, 0.0], [0.0, 0.0, 1.0, 2.0, 0.0]])
    assert_close(masked_whiten(X, MASK, unbiased=False, eps=0.0), expected)


def test_masked_whiten_without_shift_keeps_the_mean():
    # lm-human-preferences whitens rewards this way: (x - 5) / 2 + 5
    expected = torch.tensor([[3.5, 4.5, 4.5, 4.5, 0.0], [5.0, 5.0, 6.0, 7.0, 0.0]])
    assert_close(masked_whiten(X, MASK, shift_mean=False, unbiased=False, eps=0.0), expected)


def test_masked_whiten_default_is_unbiased():
    # (x - 5) / sqrt(32 / 7 + 1e-8); x = 9 -> 4 * sqrt(7 / 32) = 1.870829
    whitened = masked_whiten(X, MASK)
    assert_close(whitened[1, 3], torch.tensor(1.870829))
    assert_close(whitened[0, 0], torch.tensor(-3 * 0.4677072))


def test_masked_whiten_with_precomputed_stats():
    stats = (torch.tensor(5.0), torch.tensor(4.0))
    assert_close(masked_whiten(X[:1], MASK[:1], stats=stats, eps=0.0), torch.tensor([[-1.5, -0.5, -0.5, -0.5, 0.0]]))


def _run_on_ranks(fn, shards):
    """Runs fn(shard, reduce) on one thread per shard, with `reduce` an all-reduce (sum) between them."""
    n = len(shards)
    barrier = threading.Barrier(n, timeout=10)
    partials, results = [None] * n, [None] * n

    def make_reduce(rank):
        def reduce(partial_sums):
            partials[rank] = partial_sums.clone()
            barrier.wait()
            total = sum(partials)
            barrier.wait()  # everyone has read before the next round overwrites
            return total

        return reduce

    threads = [
        threading.Thread(target=lambda r=r: results.__setitem__(r, fn(shards[r], make_reduce(r)))) for r in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_masked_whiten_with_reduce_uses_global_statistics_across_ranks():
    # rank 0 holds row 0 (local mean 3.5), rank 1 row 1 (local mean 6.5); the global mean is 5 and the
    # global biased std 2, so each rank must get its rows of the full-batch answer.
    shards = [(X[:1], MASK[:1]), (X[1:], MASK[1:])]
    whitened = _run_on_ranks(
        lambda shard, reduce: masked_whiten(*shard, unbiased=False, eps=0.0, reduce=reduce), shards
    )
    assert_close(whitened[0], torch.tensor([[-1.5, -0.5, -0.5, -0.5, 0.0]]))
    assert_close(whitened[1], torch.tensor([[0.0, 0.0, 1.0, 2.0, 0.0]]))
    means = _run_on_ranks(lambda shard, reduce: masked_mean(*shard, reduce=reduce), shards)
    assert_close(means, [torch.tensor(5.0), torch.tensor(5.0)])
    variances = _run_on_ranks(lambda shard, reduce: masked_var(*shard, reduce=reduce), shards)
    assert_close(variances, [torch.tensor(32.0 / 7.0), torch.tensor(32.0 / 7.0)])


def test_algorithms_import_neither_ray_nor_deepspeed_nor_transformers():
    code = (
        "import sys, rlhf_ray.algorithms; "
        "loaded = [m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
