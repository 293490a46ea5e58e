"""Masked reductions over response tokens: sum, mean, variance, whitening.

Every PPO quantity for a language model lives on a (B, T) grid of response tokens, where a
response mask (1 for real response tokens, 0 for padding and for tokens after EOS) says which
cells exist. Padding must never enter a statistic, so these functions select with `torch.where`
rather than multiplying by the mask: a NaN or inf sitting in a padded cell stays out of the result
(and out of the gradient).

Whitening follows `lm-human-preferences` (Ziegler et al. 2019, `core.py:whiten`) and
Huang et al., "The N Implementation Details of RLHF with PPO" (TRL's `masked_whiten`):
`(x - mean) * rsqrt(var + 1e-8)`, adding the mean back when `shift_mean=False` (how
lm-human-preferences whitens rewards, so that their sign survives).

Global statistics across data-parallel ranks. When the rollout batch is split over ranks, the
mean and variance should be those of the whole batch, not of each shard. Two hooks allow it:

* `reduce`: a callable that takes a 1-D tensor of *local partial sums* and returns the
  elementwise sum over all ranks, for example::

      def all_reduce_sum(partial_sums):
          torch.distributed.all_reduce(partial_sums)  # op=SUM
          return partial_sums

  `masked_mean` makes one call (sum, count); `masked_var` two (sum, count; then the sum of
  squared deviations from the global mean — the two-pass form, which stays accurate when the mean
  is large compared with the spread).
* `stats=(mean, var)` on `masked_whiten`: statistics computed elsewhere (by the caller, once, for
  several tensors); no reduction happens at all.

Without either hook every statistic is local, which is right on one process.
"""

from __future__ import annotations

from typing import Callable

import torch

# Takes a 1-D tensor of local partial sums, returns the elementwise sum over all ranks.
SumReduce = Callable[[torch.Tensor], torch.Tensor]


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns the mask as bool, after checking that it has x's shape."""
    if mask.shape != x.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the tensor it masks has shape {tuple(x.shape)}; "
            "expected the same shape (e.g. (B, T) response mask for (B, T) per-token values)"
        )
    return mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over the cells where mask is 1 (all cells, or along `dim`)."""
    m = _check_mask(x, mask)
    selected = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    reduce: SumReduce | None = None,
) -> torch.Tensor:
    """Mean of x over the cells where mask is 1.

    dim=None: one number over the whole batch (the token-level mean PPO losses use).
    dim=d: a mean per slice, e.g. dim=1 gives a per-sequence mean (B,).
    reduce: all-reduce hook for a global mean across ranks (dim=None only; see module docstring).
    An empty mask gives NaN (0/0), as there is no mean to report.
    """
    total = masked_sum(x, mask, dim=dim)
    ones = mask.bool().to(x.dtype)
    count = ones.sum() if dim is None else ones.sum(dim=dim)
    if reduce is not None:
        if dim is not None:
            raise ValueError(f"masked_mean: reduce= works only with dim=None, got dim={dim}")
        total, count = reduce(torch.stack([total, count]))
    return total / count


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    reduce: SumReduce | None = None,
) -> torch.Tensor:
    """Variance of x over the cells where mask is 1, over the whole batch.

    unbiased=True divides by (n - 1) (Bessel's correction, as TRL's `masked_var`);
    unbiased=False divides by n (as `tf.nn.moments` in lm-human-preferences).
    reduce: all-reduce hook for a global variance across ranks (see module docstring).
    """
    return masked_mean_var(x, mask, unbiased=unbiased, reduce=reduce)[1]


def masked_mean_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    reduce: SumReduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of x over the cells where mask is 1, in two passes."""
    m = _check_mask(x, mask)
    total = masked_sum(x, m)
    count = m.to(x.dtype).sum()
    if reduce is not None:
        total, count = reduce(torch.stack([total, count]))
    mean = total / count
    squared_deviation = masked_sum((x - mean) ** 2, m)
    if reduce is not None:
        (squared_deviation,) = reduce(squared_deviation.reshape(1))
    n = int(count.item())
    if unbiased and n < 2:
        raise ValueError(
            f"masked_var: the unbiased variance needs at least 2 unmasked cells, the mask has {n}"
        )
    if n < 1:
        raise ValueError("masked_var: the mask selects no cells, so there is no variance")
    return mean, squared_deviation / (count - 1 if unbiased else count)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    reduce: SumReduce | None = None,
) -> torch.Tensor:
    """Normalise x to variance 1 over the cells where mask is 1; masked cells come back 0.

    shift_mean=True: mean 0 (advantages). shift_mean=False: the mean is kept, only the spread is
    scaled (rewards in lm-human-preferences).
    stats: precomputed (mean, var), e.g. global statistics; then `reduce` and `unbiased` are unused.
    reduce: all-reduce hook to compute global statistics here (see module docstring).
    """
    m = _check_mask(x, mask)
    if stats is None:
        mean, var = masked_mean_var(x, m, unbiased=unbiased, reduce=reduce)
    else:
        mean, var = stats
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
