"""Batched sampling with a KV cache that drives the text-generation vector environment.

The sampler owns the model; the environment (`envs.TextGenerationVectorEnv`) owns the episodes:
each step the sampler turns the model's next-token distribution into one action per env, and the
env appends it, decides termination (EOS) and truncation (token budget), and scores every episode
that ends in that step with one batched reward call.

Details that decide whether PPO trains (shared/PPO_DETAILS.md):
- prompts are left-padded and position ids come from the attention mask, as in HF `generate`;
- the recorded behaviour log-probability of a token is `log_softmax(logits / temperature)` of the
  *unfiltered* distribution, which is what the learner recomputes from the finished sequence
  (top-k/top-p only decide which token is drawn);
- each episode's randomness is a stream of uniforms derived from its own seed, so an episode's
  tokens do not depend on which other prompts share its batch or worker (up to float rounding of
  other batch shapes: a draw within rounding of a token boundary can fall the other way).

What keeps it fast (shared/DESIGN.md, "What is hard"; experiments/bench_rollout.py measures it against
HF `generate`), none of which changes a token or a log-probability:
- the output layer runs on the last position only (`logits_to_keep=1`, as `generate` does);
- the KV cache and the attention mask are allocated once per batch for prompt + response and
  filled in place (no `torch.cat` per step), and for plain causal models under SDPA the decoding
  step's 4D mask is handed over ready-made instead of being rebuilt by the model every step;
- per step, one (B, V) log-softmax, one device-to-host copy (the actions the env needs), and the
  (B, V) tensors are freed before the next forward pass; the division by a temperature of 1 and
  the top-k/top-p passes are skipped when they would change nothing;
- the vector env is built once per batch shape and reset, not rebuilt, for each batch;
- continuous batching (`max_batch`): at most that many episodes are decoded at once, and a row whose
  episode ends takes the next prompt (`DecodeBatch.refill`), so no row idles while prompts wait; once no
  prompt is left, rows whose episodes ended are dropped from the batch when they are half of it.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from envs.vector import TextGenerationVectorEnv
from rlhf_ray.rewards import RewardFunction, as_reward_function
from rlhf_ray.rewards.composite import reward_components


def keep_freed_memory(max_chunk: int = 32 << 20) -> bool:
    """Have glibc's malloc serve blocks of up to `max_chunk` bytes from its heap and keep freed ones.

    Every decoding step allocates and frees (B, V) logits and log-probs (6 MB at B = 32, V = 50k). Past
    glibc's mmap threshold each such block is a fresh mmap, whose pages the kernel zeroes and faults in
    on first touch, on every step: about 20% of a greedy step of a 16M-parameter GPT-2 on CPU. Served from
    the heap, the freed block of one step is the next step's. (Intel's PyTorch CPU tuning guide advises
    jemalloc or tcmalloc for the same reason.) Process-wide: rollout workers and the policy server call it;
    32 MB is the largest threshold glibc accepts on 64-bit. False where this is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, max_chunk)) and bool(mallopt(m_trim_threshold, 4 * max_chunk))


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    greedy: bool = False  # argmax; the same tokens as `model.generate(do_sample=False)`

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Episode:
    """One finished episode: the rollout record the learner trains on."""

    prompt_ids: np.ndarray  # (P,) int64
    response_ids: np.ndarray  # (R,) int64, EOS included when the episode terminated
    behaviour_logprobs: np.ndarray  # (R,) float32, log pi_behaviour(token | prefix)
    eos: bool  # terminated by EOS (False: truncated by the token budget)
    reward: float  # the reward function's score of (prompt, response)
    prompt: str
    response: str
    seed: int
    policy_version: int = 0
    worker_id: str = ""
    extra: dict = field(default_factory=dict)


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


def left_pad(sequences: list[np.ndarray] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) token ids and attention mask of variable-length sequences."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))  # (B,)
    width = int(lengths.max())
    mask = np.arange(width)[None, :] >= (width - lengths)[:, None]  # (B, T) True on real tokens
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    # boolean assignment fills row by row, left to right: the order of the concatenated sequences
    ids[mask] = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences])
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as HF `generate` does for left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# Model types whose forward builds its attention mask with `create_causal_mask` alone (full attention:
# no sliding window, no extra mask functions). Under SDPA, HF's mask for a one-token decoding step is
# then the boolean padding mask as (B, 1, 1, kv), and a 4D mask is used as given: the sampler hands a
# view of one preallocated mask over instead of having the model rebuild it every step.
PLAIN_CAUSAL_MASK_MODEL_TYPES = frozenset({"gpt2", "llama"})


@functools.lru_cache(maxsize=None)
def forward_parameters(model_class: type) -> frozenset[str]:
    """The argument names of a model class's `forward`, looked up once per class, not per call."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def takes_ready_decode_mask(model) -> bool:
    """Whether `model` can be given a prebuilt (B, 1, 1, kv) boolean mask in one-token decoding steps."""
    config = getattr(model, "config", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "model_type", None) in PLAIN_CAUSAL_MASK_MODEL_TYPES)


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of buffers sized for the whole episode: a
        step writes its new positions in place instead of copying the whole cache with `torch.cat`
        (a copy per layer per step that grows with the sequence)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity  # positions the buffers hold: prompt width + max_new_tokens

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                batch, heads, _, key_dim = key_states.shape  # (B, H, T, D)
                self.device = key_states.device
                self._key_buffer = key_states.new_empty((batch, heads, self.capacity, key_dim))
                self._value_buffer = value_states.new_empty(
                    (batch, value_states.shape[1], self.capacity, value_states.shape[-1]))
                self.length = 0
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"the KV cache holds {self.capacity} positions; a step asked for {end}")
            self._key_buffer[:, :, self.length:end] = key_states
            self._value_buffer[:, :, self.length:end] = value_states
            self.length = end
            self._refresh_views()
            return self.keys, self.values

        def _refresh_views(self) -> None:
            self.keys = self._key_buffer[:, :, :self.length]  # (B, H, length, D) views
            self.values = self._value_buffer[:, :, :self.length]

        def write_rows(self, rows: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Copy another cache's (k, H, w, D) keys and values into `rows`, columns [start, start + w)."""
            end = start + keys.shape[-2]
            self._key_buffer[rows, :, start:end] = keys
            self._value_buffer[rows, :, start:end] = values

        def drop_front(self, columns: int) -> None:
            """Forget the first `columns` positions of every row (no row attends to them any more)."""
            keep = self.length - columns
            self._key_buffer[:, :, :keep] = self._key_buffer[:, :, columns:self.length].clone()
            self._value_buffer[:, :, :keep] = self._value_buffer[:, :, columns:self.length].clone()
            self.length = keep
            self._refresh_views()

        def keep_rows(self, rows: torch.Tensor) -> None:
            """Keep only the batch rows `rows`, in that order."""
            self._key_buffer, self._value_buffer = self._key_buffer[rows], self._value_buffer[rows]
            self._refresh_views()

    return PreallocatedLayer


def preallocated_cache(model, capacity: int):
    """A `DynamicCache` for `model` whose layers write into buffers of `capacity` positions, or None
    (the model then makes its own cache) where this transformers version or model has other layers."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=config)
    except (ImportError, TypeError, ValueError, AttributeError):  # older transformers, unusual configs
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):  # sliding window, linear attention...
        return None
    cache.layers = [_preallocated_layer_class()(capacity) for _ in layers]
    return cache


class DecodeBatch:
    """The model side of B episodes decoded together: KV cache, attention mask and next positions.

    Columns are shared by all rows (column j of every row's cache was written by the same forward pass);
    a row's real tokens are the columns its mask marks. `refill` puts a new prompt into a row whose episode
    has ended: the prompt is prefilled in its own forward pass and its keys and values are copied into
    the row, right-aligned to the current last column, so the row continues with the next decoding step.
    When the cache is full, the leading columns no live row attends to are dropped (`capacity` must leave
    room for one prompt and one response beyond the oldest live row's start). Models whose cache layers
    are not plain full-attention layers (sliding windows...) cannot be refilled (`refillable` is False).
    """

    def __init__(self, model, pad_id: int, capacity: int):
        self.model, self.pad_id, self.capacity = model, pad_id, capacity
        params = forward_parameters(type(model))
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are sampled from: skips the (B, P, V) output layer in the prefill,
        # as HF `generate` does
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.ready_mask = takes_ready_decode_mask(model)
        self.cache = preallocated_cache(model, capacity)
        self.refillable = self.cache is not None
        self.device = next(model.parameters()).device

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache}, **self.extra)
        cache = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return out.logits[:, -1, :].float(), cache  # (B, V)

    def prefill(self, prompt_ids: list) -> torch.Tensor:
        """Start every row with its prompt; the next-token logits (B, V)."""
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (B, P)
        batch, width = input_ids.shape
        # The mask of the whole cache, allocated once: step t attends to a view of the first columns instead
        # of a new tensor from torch.cat every step. Columns to the right of a row's prompt are 1: decoding
        # steps fill them. Rows whose episode ended keep attending; their filler tokens are never read.
        self.mask = torch.ones((batch, self.capacity), dtype=torch.long, device=self.device)  # (B, C)
        self.mask[:, :width] = prompt_mask
        # Under SDPA a one-token step of a plain causal model takes this boolean (B, 1, 1, C) mask as is,
        # where the model would rebuild it from the 2D mask every step.
        self.mask_4d = self.mask.bool()[:, None, None, :] if self.ready_mask else None
        lengths = prompt_mask.sum(-1)  # (B,)
        self.start = (width - lengths).to(self.device)  # (B,) first column of each row's tokens
        self.next_position = lengths.to(self.device)  # (B,) position id of each row's next token
        self.length = width  # columns written
        logits, self.cache = self._forward(input_ids.to(self.device), prompt_mask.to(self.device),
                                           position_ids_from_mask(prompt_mask).to(self.device), self.cache)
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step: every row's token (B,) in, the next-token logits (B, V) out."""
        if self.length == self.capacity:
            self._drop_leading_columns()
        width = self.length + 1
        mask = self.mask_4d[..., :width] if self.mask_4d is not None else self.mask[:, :width]
        logits, self.cache = self._forward(tokens[:, None], mask, self.next_position[:, None], self.cache)
        self.length = width
        self.next_position += 1
        return logits

    def refill(self, rows: np.ndarray, prompt_ids: list) -> torch.Tensor:
        """Start new episodes in `rows` (their old ones have ended); their next-token logits (k, V)."""
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_id)  # (k, w)
        width = input_ids.shape[1]
        if width > self.length:
            raise ValueError(f"a refilled prompt of {width} tokens does not fit left of column {self.length}")
        prompt_mask = prompt_mask.to(self.device)
        logits, fresh = self._forward(input_ids.to(self.device), prompt_mask, position_ids_from_mask(prompt_mask),
                                      preallocated_cache(self.model, width))
        index = torch.as_tensor(rows, device=self.device)
        first = self.length - width
        for layer, new in zip(self.cache.layers, fresh.layers):
            layer.write_rows(index, first, new.keys, new.values)
        row_mask = torch.ones((len(rows), self.capacity), dtype=torch.long, device=self.device)
        row_mask[:, :first] = 0
        row_mask[:, first:self.length] = prompt_mask
        self.mask[index] = row_mask
        if self.mask_4d is not None:
            self.mask_4d[index] = row_mask.bool()[:, None, None, :]
        lengths = prompt_mask.sum(-1)
        self.start[index] = self.length - lengths
        self.next_position[index] = lengths
        return logits

    def retire(self, rows: np.ndarray) -> None:
        """Rows whose episode ended: their columns may be dropped."""
        self.start[torch.as_tensor(rows, device=self.device)] = self.capacity

    def keep_rows(self, rows: np.ndarray) -> None:
        """Go on with the batch rows `rows` only (the others' episodes have ended)."""
        index = torch.as_tensor(rows, device=self.device)
        for layer in self.cache.layers:
            layer.keep_rows(index)
        self.mask, self.start, self.next_position = self.mask[index], self.start[index], self.next_position[index]
        if self.mask_4d is not None:
            self.mask_4d = self.mask_4d[index]

    def _drop_leading_columns(self) -> None:
        drop = int(self.start.min().clamp(max=self.length))
        if drop == 0:
            raise RuntimeError(f"the KV cache of {self.capacity} positions is full of live tokens")
        for layer in self.cache.layers:
            layer.drop_front(drop)
        keep = self.length - drop
        self.mask[:, :keep] = self.mask[:, drop:self.length].clone()
        self.mask[:, keep:] = 1
        if self.mask_4d is not None:
            self.mask_4d.copy_(self.mask.bool()[:, None, None, :])
        self.start -= drop
        self.length = keep


class Sampler:
    """Generates episodes for a batch of prompts with a causal LM and a reward function."""

    def __init__(self, model, tokenizer, reward_fn, params: SamplingParams = SamplingParams(),
                 max_length: int | None = None, max_batch: int | None = None):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.reward_fn = as_reward_function(reward_fn)
        # the env calls this timed wrapper, which keeps the reward's own name in error messages
        self._env_reward = RewardFunction(self._timed_reward, name=self.reward_fn.name)
        self.params = params
        self.max_length = max_length  # context limit; None: longest prompt + max_new_tokens
        self.max_batch = max_batch  # episodes decoded at once; None: all prompts of a call
        self.last_reward_s = 0.0  # seconds spent in the reward function by the last `generate`
        self._cached_env: tuple[tuple, TextGenerationVectorEnv] | None = None  # (shape key, env) of the last call

    def _timed_reward(self, prompts: list[str], responses: list[str]):
        start = time.perf_counter()
        try:
            return self.reward_fn(prompts, responses)
        finally:
            self.last_reward_s += time.perf_counter() - start

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _env(self, batch: int, max_length: int) -> TextGenerationVectorEnv:
        """The vector env for `batch` episodes; kept between calls of the same shape, since building one
        (spaces, seeding, tokenizing its default prompts) costs as much as a few decoding steps and
        `reset` rewrites every array of its state."""
        key = (batch, max_length, self.params.max_new_tokens, id(self.tokenizer))
        if self._cached_env is None or self._cached_env[0] != key:
            env = TextGenerationVectorEnv(
                # every reset passes its prompt ids; the env's own prompt list is never drawn from, and an
                # empty one fits any max_length (the built-in prompts would not fit a short context)
                num_envs=batch, tokenizer=self.tokenizer, prompts=[""], reward_fn=self._env_reward,
                max_new_tokens=self.params.max_new_tokens, max_length=max_length,
                autoreset_mode=AutoresetMode.DISABLED, copy=False,
            )
            self._cached_env = (key, env)
        return self._cached_env[1]

    def _next_tokens(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token (B,) and its behaviour log-probability (B,) from next-token logits (B, V)."""
        params = self.params
        if params.temperature != 1.0:  # x / 1.0 == x: skip a (B, V) pass
            logits = logits / params.temperature
        # (torch's log_softmax on CPU is faster than its logsumexp, even for the argmax's log-prob alone)
        logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
        if params.greedy:
            tokens = argmax_rows(logits)  # (B,) the logits' argmax, as `generate` takes it
        else:
            probs = filter_top_k_top_p(logprobs.exp(), params.top_k, params.top_p)  # (B, V)
            tokens = inverse_cdf_sample(probs, uniforms)  # (B,)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]] | list[np.ndarray], seeds: list[int]) -> list[Episode]:
        """Sample one episode per prompt; `seeds[b]` alone decides the randomness of episode b.

        At most `max_batch` episodes are decoded at once; when one ends, the next prompt takes its row
        (continuous batching), and once no prompt is left the rows whose episodes ended are dropped.
        """
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(seeds)} seeds")
        if not prompt_ids:
            return []
        params, pad_id = self.params, self.tokenizer.pad_token_id
        total, new_tokens = len(prompt_ids), params.max_new_tokens
        slots = min(self.max_batch or total, total)
        prompt_width = max(len(p) for p in prompt_ids)  # of all prompts: a refill fits left of any step's column
        # a static batch needs one prompt and one response; refills need room for one more of each
        # beyond the oldest live row (see DecodeBatch)
        batch = DecodeBatch(self.model, pad_id, (prompt_width + new_tokens) * (1 if slots == total else 2))
        if slots < total and not batch.refillable:  # the model's cache cannot take rows: batches one after another
            return [episode for first in range(0, total, slots)
                    for episode in self._static_batch(prompt_ids, seeds, first, slots)]
        self.last_reward_s = 0.0
        env = self._env(slots, self.max_length or prompt_width + new_tokens)
        device = batch.device

        def on_device(indices: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(indices).to(device)

        uniforms = None  # (N, R); greedy draws nothing
        if not params.greedy:
            uniforms = torch.as_tensor(episode_uniforms(list(seeds), new_tokens), dtype=torch.float32).to(device)
        step_logprobs = torch.zeros((total, new_tokens), dtype=torch.float32, device=device)  # (N, R)
        responses = np.full((total, new_tokens), pad_id, dtype=np.int64)  # (N, R)
        response_lengths = np.zeros(total, dtype=np.int64)  # (N,)
        rewards, eos = np.zeros(total, dtype=np.float64), np.zeros(total, dtype=bool)
        texts: list[tuple[str, str] | None] = [None] * total

        slot_episode = np.arange(slots)  # (S,) episode each env slot holds; -1: none
        slot_step = np.zeros(slots, dtype=np.int64)  # (S,) tokens its episode has so far
        row_slot = np.arange(slots)  # (B,) the env slot of each model row (B < S once rows are dropped)
        queued = slots  # next prompt to start
        env.reset(options={"prompt_ids": [list(map(int, p)) for p in prompt_ids[:slots]]})
        logits = batch.prefill(prompt_ids[:slots])  # (B, V)
        while True:
            row_episode, row_step = slot_episode[row_slot], slot_step[row_slot]  # (B,)
            live = np.flatnonzero(row_episode >= 0)
            row_uniforms = None
            if uniforms is not None:  # rows without an episode draw from episode 0's stream; their token is filler
                row_uniforms = uniforms[on_device(np.maximum(row_episode, 0)),
                                        on_device(np.minimum(row_step, new_tokens - 1))]
            tokens, logprobs = self._next_tokens(logits, row_uniforms)
            del logits  # free the (B, V) tensors before the next forward pass, as HF `generate` does
            live_episodes, live_steps = row_episode[live], row_step[live]
            step_logprobs[on_device(live_episodes), on_device(live_steps)] = logprobs[on_device(live)]
            row_tokens = tokens.cpu().numpy()  # (B,) the one device-to-host copy of a step
            responses[live_episodes, live_steps] = row_tokens[live]
            actions = np.full(slots, pad_id, dtype=np.int64)  # finished envs ignore their action: filler
            actions[row_slot[live]] = row_tokens[live]
            slot_step[row_slot[live]] += 1

            _, step_rewards, terminated, truncated, infos = env.step(actions)
            finished = np.flatnonzero(terminated | truncated)  # slots
            for slot in finished:
                episode = slot_episode[slot]
                rewards[episode], eos[episode] = step_rewards[slot], terminated[slot]
                texts[episode] = (infos["prompt"][slot], infos["response"][slot])
                response_lengths[episode] = slot_step[slot]
                slot_episode[slot] = -1
            if finished.size:
                batch.retire(np.flatnonzero(np.isin(row_slot, finished)))
            free_rows = np.flatnonzero(slot_episode[row_slot] < 0)
            if queued == total:
                if free_rows.size == len(row_slot):
                    break
                if free_rows.size * 2 >= len(row_slot):  # no prompt left: go on with the live rows only
                    keep = np.flatnonzero(slot_episode[row_slot] >= 0)
                    batch.keep_rows(keep)
                    row_slot, tokens = row_slot[keep], tokens[on_device(keep)]
                    free_rows = free_rows[:0]
            logits = batch.decode(tokens)
            if queued < total and free_rows.size:
                rows = free_rows[: total - queued]
                started = np.arange(queued, queued + len(rows))
                queued += len(rows)
                slot_episode[row_slot[rows]], slot_step[row_slot[rows]] = started, 0
                reset_mask = np.zeros(slots, dtype=bool)
                reset_mask[row_slot[rows]] = True
                slot_prompts: list[list[int]] = [[] for _ in range(slots)]
                for slot, episode in zip(row_slot[rows], started):
                    slot_prompts[slot] = list(map(int, prompt_ids[episode]))
                env.reset(options={"prompt_ids": slot_prompts, "reset_mask": reset_mask})
                logits[on_device(rows)] = batch.refill(rows, [prompt_ids[e] for e in started])

        logprobs = step_logprobs.cpu().numpy()  # (N, R)
        episodes = []
        for b in range(total):
            length = int(response_lengths[b])
            prompt, response = texts[b]
            episodes.append(Episode(
                prompt_ids=np.asarray(prompt_ids[b], dtype=np.int64),
                response_ids=responses[b, :length].copy(),
                behaviour_logprobs=logprobs[b, :length].copy(),
                eos=bool(eos[b]), reward=float(rewards[b]), prompt=prompt, response=response,
                seed=int(seeds[b]),
            ))
        parts = reward_components(self.reward_fn, [e.prompt for e in episodes], [e.response for e in episodes])
        for episode, components in zip(episodes, parts or ()):
            episode.extra["reward_components"] = components
        return episodes

    def _static_batch(self, prompt_ids, seeds, first: int, size: int) -> list[Episode]:
        """Episodes of prompts [first, first + size) as one static batch; reward time adds up."""
        spent = self.last_reward_s if first else 0.0
        episodes = self.generate(prompt_ids[first:first + size], seeds[first:first + size])
        self.last_reward_s += spent
        return episodes
