"""What the next token is and where a response ends, for the rollout sampler, the environment and the
policy server alike: seeds, uniforms, top-k/top-p, draws, end-of-response tokens.

Torch and numpy only: no Ray, no gymnasium, so a Serve replica that imports it loads neither.

- `episode_seed` derives one 63-bit seed per episode from (run seed, iteration, prompt index), and
  `episode_uniforms` turns each seed into its own stream of uniforms: a sequence's tokens do not depend
  on which other sequences share its batch, worker or replica. A request's `seed` is such a seed: the
  server and the sampler given the same seed, model and settings make the same completion.
- `sample_tokens` turns next-token logits into tokens and their log-probabilities, with settings for the
  whole batch (rollouts) or per row (served requests): temperature, top-k/top-p filtering
  (`filter_top_k_top_p`), an inverse-CDF draw with one of those uniforms (`inverse_cdf_sample`) or the
  argmax (`argmax_rows`, the same tokens as HF `generate`).
- `end_of_response_ids` is where a response ends: the tokenizer's EOS and the end-of-turn tokens of
  the model's generation config.
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


def end_of_response_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """Token ids that end a response: the tokenizer's EOS and the EOS ids of the model's generation config
    (chat models often end a turn with a token of their own, such as <|im_end|>). Empty: responses end
    only by their token budget."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float | torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside the top-k and the top-p nucleus (Holtzman et al. 2019); (B, V).
    `top_p` is one value for every row or a (B, 1) tensor of each row's."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
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


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float | torch.Tensor = 1.0,
                  top_k: int = 0, top_p: float | torch.Tensor = 1.0,
                  greedy: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token (B,) and its log-probability (B,) under the temperature-scaled distribution.

    `logits` (B, V); `uniforms` (B,) one draw per row (None when every row is greedy). Settings are one
    value for the batch or per row: `temperature` and `top_p` as (B, 1) tensors, `greedy` as a (B,) bool
    tensor (rows that take the argmax; their temperature is ignored). The log-probability is that of the
    *unfiltered* distribution, which is what a learner recomputes from the finished sequence: top-k and
    top-p only decide which token is drawn. Steps that would change nothing (a temperature of 1, no
    filtering, no greedy row) are skipped.
    """
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:  # x / 1.0 == x: skip a (B, V) pass
        logits = logits / temperature
    # (torch's log_softmax on CPU is faster than its logsumexp, even for the argmax's log-prob alone)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    if greedy is True:
        tokens = argmax_rows(logits)  # (B,) the logits' argmax, as `generate` takes it
    else:
        tokens = inverse_cdf_sample(filter_top_k_top_p(logprobs.exp(), top_k, top_p), uniforms)  # (B,)
        if isinstance(greedy, torch.Tensor) and bool(greedy.any()):
            tokens = torch.where(greedy, argmax_rows(logits), tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
