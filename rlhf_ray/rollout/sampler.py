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
  tokens do not depend on which other prompts share its batch or worker.

What keeps it fast (shared/DESIGN.md, "What is hard"; experiments/bench_rollout.py measures it against
HF `generate`), none of which changes a token or a log-probability:
- the output layer runs on the last position only (`logits_to_keep=1`, as `generate` does);
- the KV cache and the attention mask are allocated once per batch for prompt + response and
  filled in place (no `torch.cat` per step), and for plain causal models under SDPA the decoding
  step's 4D mask is handed over ready-made instead of being rebuilt by the model every step;
- per step, one (B, V) log-softmax, one device-to-host copy (the actions the env needs), and the
  (B, V) tensors are freed before the next forward pass; the division by a temperature of 1 and
  the top-k/top-p passes are skipped when they would change nothing;
- the vector env is built once per batch shape and reset, not rebuilt, for each batch.
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
            self.keys = self._key_buffer[:, :, :end]  # (B, H, end, D) views
            self.values = self._value_buffer[:, :, :end]
            return self.keys, self.values

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


class Sampler:
    """Generates episodes for a batch of prompts with a causal LM and a reward function."""

    def __init__(self, model, tokenizer, reward_fn, params: SamplingParams = SamplingParams(),
                 max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.reward_fn = as_reward_function(reward_fn)
        # the env calls this timed wrapper, which keeps the reward's own name in error messages
        self._env_reward = RewardFunction(self._timed_reward, name=self.reward_fn.name)
        self.params = params
        self.max_length = max_length  # context limit; None: longest prompt + max_new_tokens
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

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]] | list[np.ndarray], seeds: list[int]) -> list[Episode]:
        """Sample one episode per prompt; `seeds[b]` alone decides the randomness of episode b."""
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(seeds)} seeds")
        if not prompt_ids:
            return []
        params, pad_id = self.params, self.tokenizer.pad_token_id
        batch, new_tokens = len(prompt_ids), params.max_new_tokens
        max_length = self.max_length or max(len(p) for p in prompt_ids) + new_tokens
        env = self._env(batch, max_length)
        self.last_reward_s = 0.0
        env.reset(options={"prompt_ids": [list(map(int, p)) for p in prompt_ids]})

        device = self.device
        uniforms = None  # (B, R); greedy draws nothing
        if not params.greedy:
            uniforms = torch.as_tensor(episode_uniforms(list(seeds), new_tokens), dtype=torch.float32).to(device)
        input_ids, prompt_mask = left_pad(prompt_ids, pad_id)  # (B, P)
        prompt_width = input_ids.shape[1]
        input_ids = input_ids.to(device)
        # The mask of the whole episode, allocated once: step t attends to the first P + t columns, a
        # view, instead of a new (B, P + t) tensor from torch.cat every step. Finished rows keep 1s:
        # their filler tokens are never read.
        attention_mask = torch.ones((batch, prompt_width + new_tokens), dtype=torch.long, device=device)  # (B, P + R)
        attention_mask[:, :prompt_width] = prompt_mask
        position_ids = position_ids_from_mask(attention_mask[:, :prompt_width])  # (B, P)
        # Without left padding HF skips the decoding mask anyway (SDPA needs none for one query token).
        decode_mask = (attention_mask.bool()[:, None, None, :]  # (B, 1, 1, P + R)
                       if takes_ready_decode_mask(self.model) and not bool(prompt_mask.all()) else None)
        step_logprobs = torch.zeros((batch, new_tokens), dtype=torch.float32, device=device)  # (B, R)
        responses = np.full((batch, new_tokens), pad_id, dtype=np.int64)  # (B, R)
        response_lengths = np.zeros(batch, dtype=np.int64)  # (B,)
        done = np.zeros(batch, dtype=bool)
        rewards = np.zeros(batch, dtype=np.float64)
        eos = np.zeros(batch, dtype=bool)
        texts: list[tuple[str, str] | None] = [None] * batch

        forward_kwargs = {"use_cache": True}
        forward_params = forward_parameters(type(self.model))
        # transformers 5 renamed `past_key_values` to `cache` (argument and output)
        cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        forward_kwargs[cache_arg] = preallocated_cache(self.model, prompt_width + new_tokens)
        if "logits_to_keep" in forward_params:
            # only the last position's logits are sampled from: skips the (B, P, V) output layer in
            # the prefill, as HF `generate` does
            forward_kwargs["logits_to_keep"] = 1
        for step in range(new_tokens):
            width = prompt_width + step  # tokens the model has seen after this step's input
            step_mask = (attention_mask[:, :width] if step == 0 or decode_mask is None
                         else decode_mask[..., :width])  # (B, P + t) or (B, 1, 1, P + t)
            out = self.model(input_ids=input_ids, attention_mask=step_mask, position_ids=position_ids,
                             **forward_kwargs)
            forward_kwargs[cache_arg] = out[cache_arg] if cache_arg in out else out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            if params.temperature != 1.0:  # x / 1.0 == x: skip a (B, V) pass
                logits = logits / params.temperature
            logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
            if params.greedy:
                tokens = torch.argmax(logits, dim=-1)  # (B,)
            else:
                probs = filter_top_k_top_p(logprobs.exp(), params.top_k, params.top_p)  # (B, V)
                tokens = inverse_cdf_sample(probs, uniforms[:, step])  # (B,)
                del probs
            if done.any():  # finished envs ignore their action; send the pad token as filler
                tokens = tokens.masked_fill(torch.from_numpy(done).to(device), pad_id)
            step_logprobs[:, step] = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
            # free the (B, V) tensors now, not when the next step rebinds the names: the allocator can then
            # give their memory to the next step's logits instead of mapping fresh pages (as HF `generate`
            # does with `del outputs`)
            del out, logits, logprobs
            actions = tokens.cpu().numpy()  # (B,) the one device-to-host copy of a step
            active = ~done
            responses[active, step] = actions[active]
            response_lengths += active

            _, step_rewards, terminated, truncated, infos = env.step(actions)
            finished = terminated | truncated
            if finished.any():
                rewards[finished] = step_rewards[finished]
                eos[terminated] = True
                for b in np.flatnonzero(finished):
                    texts[b] = (infos["prompt"][b], infos["response"][b])
                done |= finished
            if done.all():
                break
            input_ids = tokens[:, None]  # (B, 1)
            position_ids = position_ids[:, -1:] + 1  # (B, 1)

        logprobs = step_logprobs.cpu().numpy()  # (B, R)
        episodes = []
        for b in range(batch):
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
