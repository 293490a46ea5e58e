"""Sampling math shared by the rollout sampler and the policy server: seeds, uniforms, top-k/top-p, draws.

Torch and numpy only: no Ray, no gymnasium, so a Serve replica that imports it loads neither.

- `episode_seed` derives one 63-bit seed per sequence from (run or request seed, position, index), and
  `episode_uniforms` turns each seed into its own stream of uniforms: a sequence's tokens do not depend
  on which other sequences share its batch, worker or replica.
- `filter_top_k_top_p` and `inverse_cdf_sample` draw a token from a filtered distribution with one of
  those uniforms; `argmax_rows` is greedy decoding's argmax (the same tokens as HF `generate`).
"""

from __future__ import annotations

import numpy as np
import torch


def episode_seed(run_seed: int, iteration: int, prompt_index: int) -> int:
    """A 63-bit seed for one episode, derived from the run seed and the prompt's place in the run."""
    return int(np.random.SeedSequence([run_seed, iteration, prompt_index]).generate_state(1, np.uint64)[0] >> 1)


def episode_uniforms(seeds: list[int], steps: int) -> np.ndarray:
    """(B, steps) uniforms in [0, 1); row b depends only on seeds[b]."""
    return np.stack([np.random.default_rng(seed).random(steps) for seed in seeds]) if seeds else np.zeros((0, steps))


def filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the probabilities outside the top-k and the top-p nucleus (Holtzman et al. 2019); (B, V)."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids drawn from unnormalised `probs` (B, V) with one uniform per row (B,)."""
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # (B,) in [0, V]
    # Rounding can put the target at the very end of the cdf (token V); fall back to the last token
    # with mass. Any other result already has mass, so the (B, V) scan runs only when a row overflowed.
    overflow = tokens >= probs.shape[-1]
    if overflow.any():
        rows = probs[overflow]  # (O, V)
        last_nonzero = rows.shape[-1] - 1 - torch.argmax((rows.flip(-1) > 0).int(), dim=-1)
        tokens = tokens.masked_scatter(overflow, last_nonzero)
    return tokens


def argmax_rows(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`torch.argmax(x, dim=-1)` of a (B, V) tensor (the first index of each row's maximum).

    On CPU torch's argmax is scalar code and its amax vectorised: the maximum of each block of `block`
    columns, then the first block holding the row's maximum, then the argmax within that block, is about
    5x faster at V = 50k. Elsewhere, or for small V, `torch.argmax` itself.
    """
    rows, width = x.shape
    if x.device.type != "cpu" or width < 4 * block:
        return torch.argmax(x, dim=-1)
    full = width // block * block
    maxima = x[:, :full].reshape(rows, -1, block).amax(-1)  # (B, V // block)
    if full < width:
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], dim=-1)
    start = torch.argmax(maxima, dim=-1) * block  # (B,) first column of the first block with the maximum
    # the last block may be short: its columns past V - 1 repeat column V - 1, after the real one
    columns = (start[:, None] + torch.arange(block, device=x.device)).clamp_(max=width - 1)  # (B, block)
    return start + torch.argmax(x.gather(-1, columns), dim=-1)
