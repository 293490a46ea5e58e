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

import time
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from envs.vector import TextGenerationVectorEnv
from rlhf_ray.rewards import RewardFunction, as_reward_function
from rlhf_ray.rollout.decoding import DecodeBatch
from rlhf_ray.sampling import argmax_rows, episode_seed, episode_uniforms, filter_top_k_top_p, inverse_cdf_sample

__all__ = ["Episode", "Sampler", "SamplingParams", "episode_seed"]  # episode_seed: callers seed episodes here


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
    reward_components: dict[str, float] | None = None  # a composite reward's unweighted terms, by name


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
            return self.reward_fn.score(prompts, responses)  # the components travel with the total
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
        components: list[dict[str, float] | None] = [None] * total

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
                if "reward_components" in infos:
                    components[episode] = infos["reward_components"][slot]
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
                seed=int(seeds[b]), reward_components=components[b],
            ))
        return episodes

    def _static_batch(self, prompt_ids, seeds, first: int, size: int) -> list[Episode]:
        """Episodes of prompts [first, first + size) as one static batch; reward time adds up."""
        spent = self.last_reward_s if first else 0.0
        episodes = self.generate(prompt_ids[first:first + size], seeds[first:first + size])
        self.last_reward_s += spent
        return episodes
