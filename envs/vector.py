"""A batch of text-generation episodes stepped with numpy arrays: the env the rollout sampler drives.

Same episodes as `envs.text_generation.TextGenerationEnv`, N at a time. The state is a handful of
arrays (token ids, lengths, prompt lengths, prompt indices, ended flags); a step is a few numpy
operations whatever N is; only episodes that finish are decoded, and all that finish in one step are
scored with one call of the reward function (a reward model scores them as one batch).

Autoreset follows Gymnasium 1.x (https://farama.org/Vector-Autoreset-Mode):
- NEXT_STEP (default): an env whose episode ended in step t is reset in step t+1; its action in
  t+1 is ignored and it returns the first observation of a new episode, reward 0, not terminated,
  not truncated.
- DISABLED: an env whose episode ended stays ended until `reset(options={"reset_mask": ...})`; in
  the meantime its actions are ignored and it returns its final observation, reward 0, not
  terminated, not truncated. (Gymnasium's own vector envs assume the user never steps an ended env;
  the sampler does, with filler actions, and this env tolerates it.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.text_generation import NO_PROMPT, TextGenerationTask
from rlhf_ray.rewards import RewardSpec

_PROMPT_OPTIONS = ("prompt_indices", "prompts", "prompt_ids")


class TextGenerationVectorEnv(VectorEnv):
    """`num_envs` text-generation episodes as arrays.

    Args:
        num_envs: N, the number of episodes stepped together.
        tokenizer, prompts, reward_fn, max_new_tokens, max_length, stop_token_ids: as `TextGenerationEnv`.
        autoreset_mode: `AutoresetMode.NEXT_STEP` (default) or `AutoresetMode.DISABLED`.
        copy: return copies of the observation arrays; False returns the internal buffers
            themselves (they change in the next step), which saves a copy per step.

    `reset(options=...)` may hold one of `{"prompt_indices": (N,) ints}`, `{"prompts": N texts}`,
    `{"prompt_ids": N lists of token ids}` (otherwise prompts are drawn with `self.np_random`), and
    `{"reset_mask": (N,) bool}` to reset only those envs (their entries of the prompt option are used).
    """

    def __init__(self, num_envs: int = 1, tokenizer: Any = None, prompts: list[str] | None = None,
                 reward_fn: RewardSpec | None = None, max_new_tokens: int = 16, max_length: int | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, copy: bool = True,
                 stop_token_ids: Any = None):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        mode = autoreset_mode if isinstance(autoreset_mode, AutoresetMode) else AutoresetMode(autoreset_mode)
        if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED):
            raise ValueError(f"autoreset_mode {mode} is not supported; expected AutoresetMode.NEXT_STEP or "
                             "AutoresetMode.DISABLED")
        self.num_envs = int(num_envs)
        self.autoreset_mode = mode
        self.copy = copy
        self.metadata = {"autoreset_mode": mode}  # where Gymnasium 1.x looks for it
        self.task = TextGenerationTask.build(tokenizer, prompts, reward_fn, max_new_tokens, max_length, stop_token_ids)
        self.tokenizer, self.prompts, self.reward_fn = self.task.tokenizer, self.task.prompts, self.task.reward_fn
        self.max_new_tokens, self.max_length = self.task.max_new_tokens, self.task.max_length

        self.single_observation_space = self.task.observation_space()
        self.single_action_space = spaces.Discrete(self.task.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)  # MultiDiscrete

        n, pad = self.num_envs, self.task.pad_token_id
        self.tokens = np.full((n, self.max_length), pad, dtype=np.int64)  # (N, L) prompt + response, right-padded
        self.lengths = np.zeros(n, dtype=np.int64)  # (N,) tokens so far
        self.prompt_lengths = np.zeros(n, dtype=np.int64)  # (N,)
        self.prompt_indices = np.full(n, NO_PROMPT, dtype=np.int64)  # (N,) NO_PROMPT: given explicitly
        self.ended = np.ones(n, dtype=bool)  # (N,) episode over: autoreset next step (NEXT_STEP) or wait (DISABLED)
        self._prompt_texts = np.full(n, None, dtype=object)  # (N,) text of an explicit prompt; None: look up/decode
        self._has_reset = False

    # ------------------------------------------------------------------ cheap views of the state

    @property
    def response_lengths(self) -> np.ndarray:
        """(N,) response tokens so far of each env's current (or just finished) episode."""
        return self.lengths - self.prompt_lengths

    def response_ids(self, env: int) -> np.ndarray:
        """The response tokens so far of env `env`, shape (R,) (a view of the buffer)."""
        return self.tokens[env, self.prompt_lengths[env]:self.lengths[env]]

    # ------------------------------------------------------------------ reset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None (one generator draws every env's prompt), got {seed!r}")
        super().reset(seed=None if seed is None else int(seed))
        options = dict(options or {})
        unknown = set(options) - {*_PROMPT_OPTIONS, "reset_mask"}
        given = [key for key in _PROMPT_OPTIONS if key in options]
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'reset_mask' and at most one of "
                             f"{list(_PROMPT_OPTIONS)}")
        if len(given) > 1:
            raise ValueError(f"reset options {given} all choose prompts; expected at most one of them")

        if "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},), "
                                 f"got {mask.dtype} of shape {mask.shape}")
            envs = np.flatnonzero(mask)
        else:
            envs = np.arange(self.num_envs)

        if "prompt_indices" in options:
            indices = np.asarray(options["prompt_indices"])
            if indices.shape != (self.num_envs,) or not np.issubdtype(indices.dtype, np.integer):
                raise ValueError(f"options['prompt_indices'] must be an integer array of shape ({self.num_envs},), "
                                 f"got {indices.dtype} of shape {indices.shape}")
            bad = [e for e in envs if not 0 <= indices[e] < len(self.prompts)]
            if bad:
                raise ValueError(f"options['prompt_indices'][{bad[0]}] is {indices[bad[0]]}; expected an index "
                                 f"in [0, {len(self.prompts)})")
            self._load_prompt_indices(envs, indices[envs].astype(np.int64))
        elif "prompts" in options or "prompt_ids" in options:
            key = given[0]
            values = options[key]
            if isinstance(values, (str, bytes)) or len(values) != self.num_envs:
                raise ValueError(f"options[{key!r}] must be a list of {self.num_envs} entries (one per env), "
                                 f"got {values!r:.80}")
            if key == "prompts":
                ids = [self.task.encode_prompt(values[e], f"options['prompts'][{e}]") for e in envs]
                known = np.array([self.task.index_of(values[e]) for e in envs], dtype=np.int64)
                texts = [values[e] for e in envs]
            else:
                ids = [self.task.check_prompt_ids(values[e], f"options['prompt_ids'][{e}]") for e in envs]
                known = np.full(len(envs), NO_PROMPT, dtype=np.int64)
                texts = [None] * len(envs)
            lengths = np.array([a.size for a in ids], dtype=np.int64)
            flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if ids else lengths
            self._write_prompts(envs, flat, offsets, lengths)
            self.prompt_indices[envs] = known
            for env, text in zip(envs, texts):
                self._prompt_texts[env] = text
        else:
            self._load_prompt_indices(envs, self.np_random.integers(len(self.prompts), size=envs.size))

        self.ended[envs] = False
        self._has_reset = True
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[envs] = True
        infos = {"prompt_index": np.where(mask, self.prompt_indices, 0), "_prompt_index": mask}
        return self._observations(), infos

    def _load_prompt_indices(self, envs: np.ndarray, indices: np.ndarray) -> None:
        """Start the episodes of `envs` from the env's prompts `indices` (no tokenization)."""
        self._write_prompts(envs, self.task.prompt_flat_ids, self.task.prompt_offsets[indices],
                            self.task.prompt_lengths[indices])
        self.prompt_indices[envs] = indices
        self._prompt_texts[envs] = None

    def _write_prompts(self, envs: np.ndarray, flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Clear the rows `envs` and copy prompt k = flat[offsets[k]: offsets[k] + lengths[k]] into row envs[k]."""
        self.tokens[envs] = self.task.pad_token_id
        total = int(lengths.sum())
        rows = np.repeat(envs, lengths)  # (T,) one entry per prompt token
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # (T,)
        cols = np.arange(total) - starts  # (T,) position of each token in its prompt
        self.tokens[rows, cols] = flat[np.repeat(offsets, lengths) + cols]
        self.lengths[envs] = lengths
        self.prompt_lengths[envs] = lengths

    # ------------------------------------------------------------------ step

    def step(self, actions: Any):
        stepping, tokens, active = self._append_actions(actions)
        n = self.num_envs
        terminated = np.zeros(n, dtype=bool)
        terminated[stepping] = self.task.ends_response(tokens)
        # an EOS that also uses up the budget counts as terminated: the policy chose to stop
        out_of_budget = (self.response_lengths >= self.max_new_tokens) | (self.lengths >= self.max_length)
        truncated = active & ~terminated & out_of_budget
        finished = terminated | truncated
        self.ended |= finished

        rewards = np.zeros(n, dtype=np.float64)
        infos: dict[str, Any] = {}
        if finished.any():
            rewards, infos = self._score(np.flatnonzero(finished), finished)
        return self._observations(), rewards, terminated, truncated, infos

    def _append_actions(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check the actions, autoreset ended envs (NEXT_STEP), and append the active envs' tokens: the envs
        that stepped (A,), their tokens (A,), and which envs were active (N,)."""
        if not self._has_reset:
            raise RuntimeError("step() called before reset(); call reset() first")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be an integer array of shape ({self.num_envs},) (one token id per env), "
                             f"got {actions.dtype} of shape {actions.shape}")
        active = ~self.ended  # (N,) envs that take their action this step
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self.ended.any():
            restarting = np.flatnonzero(self.ended)
            self._load_prompt_indices(restarting, self.np_random.integers(len(self.prompts), size=restarting.size))
            self.ended[restarting] = False

        stepping = np.flatnonzero(active)  # (A,)
        tokens = actions[stepping].astype(np.int64)  # (A,)
        invalid = np.flatnonzero((tokens < 0) | (tokens >= self.task.vocab_size))
        if invalid.size:
            env = int(stepping[invalid[0]])
            raise ValueError(f"actions[{env}] is {int(tokens[invalid[0]])}, not a token id: expected an integer "
                             f"in [0, {self.task.vocab_size})")
        self.tokens[stepping, self.lengths[stepping]] = tokens
        self.lengths[stepping] += 1
        return stepping, tokens, active

    def _score(self, envs: np.ndarray, finished: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode the episodes of `envs`, score them in one reward call, and make their infos."""
        prompts = [self._prompt_text(e) for e in envs]
        responses = self._response_texts(envs)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        scored = self.reward_fn.score(prompts, responses)  # one batched call for every finished episode
        rewards[envs] = scored.total

        prompt_array = np.full(self.num_envs, None, dtype=object)
        response_array = np.full(self.num_envs, None, dtype=object)
        for e, prompt, response in zip(envs, prompts, responses):
            prompt_array[e], response_array[e] = prompt, response
        infos = {
            "prompt": prompt_array, "_prompt": finished.copy(),
            "response": response_array, "_response": finished.copy(),
            "prompt_index": np.where(finished, self.prompt_indices, 0), "_prompt_index": finished.copy(),
            "response_length": np.where(finished, self.response_lengths, 0), "_response_length": finished.copy(),
        }
        per_item = scored.per_item()
        if per_item is not None:  # a composite reward: each episode's components, {name: score}
            components = np.full(self.num_envs, None, dtype=object)
            for e, parts in zip(envs, per_item):
                components[e] = parts
            infos["reward_components"], infos["_reward_components"] = components, finished.copy()
        return rewards, infos

    def _response_texts(self, envs: np.ndarray) -> list[str]:
        """What the reward function reads as the responses of `envs`."""
        return self.task.decode_responses([self.response_ids(e) for e in envs])

    def _prompt_text(self, env: int) -> str:
        if self._prompt_texts[env] is not None:
            return self._prompt_texts[env]
        if self.prompt_indices[env] != NO_PROMPT:
            return self.prompts[self.prompt_indices[env]]
        return self.task.decode_prompt(self.tokens[env, :self.prompt_lengths[env]])

    def _observations(self) -> dict[str, np.ndarray]:
        observations = {"input_ids": self.tokens, "length": self.lengths, "prompt_length": self.prompt_lengths}
        return {key: value.copy() for key, value in observations.items()} if self.copy else observations
