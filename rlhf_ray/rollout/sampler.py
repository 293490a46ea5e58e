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

Multi-turn episodes (`params.dialogue`, `envs.dialogue.DialogueVectorEnv`): when a row's assistant turn ends
and the conversation goes on, the env returns the tokens it appends (the user's or the tool's message in the
chat template, encoded once); the sampler records them as context (action mask 0, log-prob 0) and puts them
into the row's KV cache with one forward pass over them (`DecodeBatch.extend`), after the step that fed the
turn's last token, so nothing is prefilled twice and the ids the learner trains on are the ids decoded.

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

from envs.dialogue import DialogueVectorEnv
from envs.vector import TextGenerationVectorEnv
from rlhf_ray.rewards import RewardFunction, as_reward_function
from rlhf_ray.decoding import DecodeBatch
from rlhf_ray.sampling import end_of_response_ids, episode_seed, episode_uniforms, sample_tokens

__all__ = ["DialogueParams", "Episode", "Sampler", "SamplingParams", "episode_seed"]  # episode_seed: callers seed episodes here


@dataclass(frozen=True)
class DialogueParams:
    """Multi-turn episodes (`envs.dialogue`): after each assistant turn the task's user or tool answers."""

    task: str  # `envs.dialogue.load_task`: "refund", "calculator" or "module:name"
    max_turns: int = 3  # assistant turns per episode
    max_env_tokens: int = 24  # tokens appended after one turn (a message and the template's marks)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16  # per assistant turn in a dialogue
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    greedy: bool = False  # argmax; the same tokens as `model.generate(do_sample=False)`
    dialogue: DialogueParams | None = None  # None: one prompt, one response

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
    # a dialogue's: (R,) 1 on the policy's tokens, 0 on those the environment appended (a user's or a tool's
    # message and the template's marks, whose behaviour log-probs are 0); None: every response token is an action
    action_mask: np.ndarray | None = None
    turns: list[dict] | None = None  # a dialogue's turns after the prompt, [{role, content}]
    # a dialogue's per-turn rewards (`envs.dialogue.Reply.reward`): (R,) on the last token of each turn they
    # reward, 0 elsewhere; `reward` is the reward function's score at the end. None: no turn was rewarded
    turn_rewards: np.ndarray | None = None


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

    def _max_length(self, prompt_width: int) -> int:
        """The context limit: `max_length`, else the longest prompt and the response (every turn of a dialogue
        and the messages between them)."""
        if self.max_length:
            return self.max_length
        dialogue = self.params.dialogue
        if dialogue is None:
            return prompt_width + self.params.max_new_tokens
        return prompt_width + dialogue.max_turns * self.params.max_new_tokens + (
            dialogue.max_turns - 1) * dialogue.max_env_tokens

    def _env(self, batch: int, max_length: int) -> TextGenerationVectorEnv:
        """The vector env for `batch` episodes; kept between calls of the same shape, since building one
        (spaces, seeding, tokenizing its default prompts) costs as much as a few decoding steps and
        `reset` rewrites every array of its state."""
        key = (batch, max_length, self.params.max_new_tokens, id(self.tokenizer))
        if self._cached_env is None or self._cached_env[0] != key:
            stop_ids = end_of_response_ids(self.tokenizer, getattr(self.model, "generation_config", None))
            if self.params.dialogue is not None:
                dialogue = self.params.dialogue
                env = DialogueVectorEnv(
                    num_envs=batch, tokenizer=self.tokenizer, prompts=[""], task=dialogue.task,
                    reward_fn=self._env_reward, max_new_tokens=self.params.max_new_tokens,
                    max_turns=dialogue.max_turns, max_env_tokens=dialogue.max_env_tokens, max_length=max_length,
                    autoreset_mode=AutoresetMode.DISABLED, copy=False, stop_token_ids=stop_ids)
                self._cached_env = (key, env)
                return env
            env = TextGenerationVectorEnv(
                # every reset passes its prompt ids; the env's own prompt list is never drawn from, and an
                # empty one fits any max_length (the built-in prompts would not fit a short context)
                num_envs=batch, tokenizer=self.tokenizer, prompts=[""], reward_fn=self._env_reward,
                max_new_tokens=self.params.max_new_tokens, max_length=max_length,
                autoreset_mode=AutoresetMode.DISABLED, copy=False,
                # where a response ends: the same tokens as the policy server's (the model's end of turn too)
                stop_token_ids=stop_ids,
            )
            self._cached_env = (key, env)
        return self._cached_env[1]

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
        params = self.params
        total = len(prompt_ids)
        size = min(self.max_batch or total, total)
        prompt_width = max(len(p) for p in prompt_ids)  # of all prompts: a refill fits left of any step's column
        max_length = self._max_length(prompt_width)
        # response tokens an episode may have: a dialogue's include the messages the environment appends
        new_tokens = params.max_new_tokens if params.dialogue is None else max_length
        # a static batch needs one prompt and one response; refills need room for one more of each
        # beyond the oldest live row (see DecodeBatch)
        capacity = min(prompt_width + new_tokens, max_length) * (1 if size == total else 2)
        # the environment's tokens leave holes in the other rows until `DecodeBatch` compacts them
        batch = DecodeBatch(self.model, self.tokenizer.pad_token_id, capacity,
                            max_capacity=None if params.dialogue is None else 4 * max_length)
        if params.dialogue is not None and not batch.refillable:
            raise RuntimeError(f"dialogues append the environment's tokens to live rows, which this model's KV cache "
                               f"({type(self.model).__name__}: not plain full-attention layers) cannot take")
        if size < total and not batch.refillable:  # the model's cache cannot take rows: batches one after another
            return [episode for first in range(0, total, size)
                    for episode in self._static_batch(prompt_ids, seeds, first, size)]
        self.last_reward_s = 0.0
        env = self._env(size, max_length)
        record = _EpisodeRecord(total, new_tokens, self.tokenizer.pad_token_id, batch.device,
                                dialogue=params.dialogue is not None)
        slots = _Slots(size, total)
        uniforms = None  # (N, R); greedy draws nothing
        if not params.greedy:
            uniforms = torch.as_tensor(episode_uniforms(list(seeds), new_tokens), dtype=torch.float32).to(batch.device)

        env.reset(options={"prompt_ids": [list(map(int, p)) for p in prompt_ids[:size]]})
        logits = batch.prefill(prompt_ids[:size])  # (B, V)
        while True:
            episodes, steps, live = slots.rows()  # (B,) each row's episode and its tokens so far; live rows
            row_uniforms = None
            if uniforms is not None:  # rows without an episode draw from episode 0's stream; their token is filler
                row_uniforms = uniforms[record.on_device(np.maximum(episodes, 0)),
                                        record.on_device(np.minimum(steps, new_tokens - 1))]
            tokens, logprobs = sample_tokens(logits, row_uniforms, params.temperature, params.top_k, params.top_p,
                                             params.greedy)
            del logits  # free the (B, V) tensors before the next forward pass, as HF `generate` does
            row_tokens = tokens.cpu().numpy()  # (B,) the one device-to-host copy of a step
            record.tokens(episodes[live], steps[live], row_tokens[live], logprobs[record.on_device(live)])
            _, step_rewards, terminated, truncated, infos = env.step(slots.advance(live, row_tokens, record.pad_id))
            # a dialogue's turns that ended and go on: the environment's tokens follow (context, not actions)
            answered = np.flatnonzero(infos["_appended"]) if "appended" in infos else _NONE  # env slots
            if "turn_reward" in infos:  # on the turn's last token, before the environment's tokens follow it
                for slot in np.flatnonzero(infos["_turn_reward"]):
                    record.turn_reward(slots.episode[slot], slots.step[slot] - 1, infos["turn_reward"][slot])
                    step_rewards[slot] -= infos["turn_reward"][slot]  # what is left is the score at the end
            for slot in answered:
                record.context(slots.episode[slot], slots.step[slot], infos["appended"][slot])
                slots.step[slot] += len(infos["appended"][slot])
            finished = np.flatnonzero(terminated | truncated)  # env slots
            if finished.size:
                for slot in finished:
                    record.finish(slots.episode[slot], slots.step[slot], step_rewards[slot], terminated[slot],
                                  infos, slot)
                batch.retire(slots.finish(finished))
            if slots.all_started() and slots.drop_ended():  # no prompt left, half the rows idle: go on without them
                if not slots.row_slot.size:
                    break
                batch.keep_rows(slots.kept)
                tokens = tokens[record.on_device(slots.kept)]
            logits = batch.decode(tokens)  # the sampled tokens go into the cache, the turn's last one included
            if answered.size:  # then the environment's, with one forward pass over those rows' new tokens
                rows = np.flatnonzero(np.isin(slots.row_slot, answered))
                logits[record.on_device(rows)] = batch.extend(rows, [infos["appended"][slots.row_slot[r]]
                                                                     for r in rows])
            rows, started = slots.start_next()
            if rows.size:
                env.reset(options={"prompt_ids": slots.env_prompts(rows, started, prompt_ids),
                                   "reset_mask": slots.reset_mask(rows)})
                logits[record.on_device(rows)] = batch.refill(rows, [prompt_ids[e] for e in started])
        return record.episodes(prompt_ids, seeds)

    def _static_batch(self, prompt_ids, seeds, first: int, size: int) -> list[Episode]:
        """Episodes of prompts [first, first + size) as one static batch; reward time adds up."""
        spent = self.last_reward_s if first else 0.0
        episodes = self.generate(prompt_ids[first:first + size], seeds[first:first + size])
        self.last_reward_s += spent
        return episodes


_NONE = np.zeros(0, dtype=np.int64)


class _Slots:
    """Continuous batching's bookkeeping: which episode each env slot holds, how many tokens it has, and
    which env slot each model row decodes (there are fewer rows than slots once ended rows are dropped)."""

    def __init__(self, size: int, total: int):
        self.total = total  # episodes to make
        self.episode = np.arange(size)  # (S,) episode each env slot holds; -1: none
        self.step = np.zeros(size, dtype=np.int64)  # (S,) tokens its episode has so far
        self.row_slot = np.arange(size)  # (B,) env slot of each model row
        self.queued = size  # next episode to start
        self.kept = self.row_slot  # rows kept by the last `drop_ended`

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's episode (-1: none) and its tokens so far, (B,) each; and the rows with an episode."""
        episodes = self.episode[self.row_slot]
        return episodes, self.step[self.row_slot], np.flatnonzero(episodes >= 0)

    def advance(self, live: np.ndarray, row_tokens: np.ndarray, filler: int) -> np.ndarray:
        """Count the live rows' new tokens; the env's actions (S,): those tokens, filler elsewhere (ended envs
        ignore theirs)."""
        actions = np.full(len(self.episode), filler, dtype=np.int64)
        actions[self.row_slot[live]] = row_tokens[live]
        self.step[self.row_slot[live]] += 1
        return actions

    def finish(self, slots: np.ndarray) -> np.ndarray:
        """Empty `slots` (their episodes ended); the model rows that decoded them."""
        self.episode[slots] = -1
        return np.flatnonzero(np.isin(self.row_slot, slots))

    def all_started(self) -> bool:
        return self.queued == self.total

    def drop_ended(self) -> bool:
        """Drop the rows without an episode when they are half the batch (or all of it); whether it did.
        The rows kept are `kept`, in order."""
        idle = int((self.episode[self.row_slot] < 0).sum())
        if idle * 2 < len(self.row_slot) or idle == 0:
            return False
        self.kept = np.flatnonzero(self.episode[self.row_slot] >= 0)
        self.row_slot = self.row_slot[self.kept]
        return True

    def start_next(self) -> tuple[np.ndarray, np.ndarray]:
        """Give the rows without an episode the next episodes: (rows, episodes), both empty when none is free."""
        if self.queued == self.total:
            return _NONE, _NONE
        free = np.flatnonzero(self.episode[self.row_slot] < 0)[: self.total - self.queued]
        started = np.arange(self.queued, self.queued + len(free))
        self.queued += len(free)
        self.episode[self.row_slot[free]], self.step[self.row_slot[free]] = started, 0
        return free, started

    def env_prompts(self, rows: np.ndarray, started: np.ndarray, prompt_ids) -> list[list[int]]:
        """The env's `prompt_ids` reset option: the started episodes' prompts in their slots."""
        prompts: list[list[int]] = [[] for _ in self.episode]
        for slot, episode in zip(self.row_slot[rows], started):
            prompts[slot] = list(map(int, prompt_ids[episode]))
        return prompts

    def reset_mask(self, rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(self.episode), dtype=bool)
        mask[self.row_slot[rows]] = True
        return mask


class _EpisodeRecord:
    """What the episodes of one `generate` call have made so far: tokens, log-probs, rewards, texts."""

    def __init__(self, total: int, new_tokens: int, pad_id: int, device: torch.device, dialogue: bool = False):
        self.device, self.pad_id = device, pad_id
        # a dialogue's: 0 where the environment appended tokens; None: every token is an action
        self.action_mask = np.ones((total, new_tokens), dtype=np.int8) if dialogue else None  # (N, R)
        self.turns: list[list[dict] | None] = [None] * total
        self.turn_rewards: dict[int, np.ndarray] = {}  # episode -> (R,), for the episodes with a turn reward
        self.logprobs = torch.zeros((total, new_tokens), dtype=torch.float32, device=device)  # (N, R)
        self.responses = np.full((total, new_tokens), pad_id, dtype=np.int64)  # (N, R)
        self.lengths = np.zeros(total, dtype=np.int64)  # (N,)
        self.rewards, self.eos = np.zeros(total, dtype=np.float64), np.zeros(total, dtype=bool)
        self.texts: list[tuple[str, str] | None] = [None] * total
        self.components: list[dict[str, float] | None] = [None] * total

    def on_device(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(indices).to(self.device)

    def tokens(self, episodes: np.ndarray, steps: np.ndarray, tokens: np.ndarray, logprobs: torch.Tensor) -> None:
        self.logprobs[self.on_device(episodes), self.on_device(steps)] = logprobs
        self.responses[episodes, steps] = tokens

    def context(self, episode: int, step: int, token_ids: np.ndarray) -> None:
        """Tokens the environment appended to `episode` at response position `step` (log-probs stay 0)."""
        self.responses[episode, step:step + len(token_ids)] = token_ids
        self.action_mask[episode, step:step + len(token_ids)] = 0

    def turn_reward(self, episode: int, step: int, reward: float) -> None:
        """A reward for the turn of `episode` whose last token is at response position `step`."""
        self.turn_rewards.setdefault(episode, np.zeros(self.responses.shape[1], dtype=np.float32))[step] += reward

    def finish(self, episode: int, length: int, reward: float, terminated: bool, infos: dict, slot: int) -> None:
        self.rewards[episode], self.eos[episode], self.lengths[episode] = reward, terminated, length
        self.texts[episode] = (infos["prompt"][slot], infos["response"][slot])
        if "reward_components" in infos:
            self.components[episode] = infos["reward_components"][slot]
        if "turns" in infos:
            self.turns[episode] = infos["turns"][slot]

    def episodes(self, prompt_ids, seeds) -> list[Episode]:
        logprobs = self.logprobs.cpu().numpy()  # (N, R)
        episodes = []
        for b, length in enumerate(self.lengths.tolist()):
            prompt, response = self.texts[b]
            episodes.append(Episode(
                prompt_ids=np.asarray(prompt_ids[b], dtype=np.int64),
                response_ids=self.responses[b, :length].copy(),
                behaviour_logprobs=logprobs[b, :length].copy(),
                eos=bool(self.eos[b]), reward=float(self.rewards[b]), prompt=prompt, response=response,
                seed=int(seeds[b]), reward_components=self.components[b],
                action_mask=None if self.action_mask is None else self.action_mask[b, :length].copy(),
                turns=self.turns[b],
                turn_rewards=self.turn_rewards[b][:length].copy() if b in self.turn_rewards else None,
            ))
        return episodes
