"""Text generation as a Gymnasium environment: one action is one token.

An episode starts from a prompt and appends one token per step until the policy emits an
end-of-response token (terminated: the tokenizer's EOS or the model's end of turn, see
`rlhf_ray.sampling.end_of_response_ids`) or the token budget runs out (truncated): `max_new_tokens`
new tokens, or `max_length` tokens in all. The reward is 0 per token and, at the end, the reward function's score of the
finished (prompt, response), as in the RLHF setup of Ziegler et al. 2019 and Ouyang et al. 2022
(the per-token KL penalty is the learner's business, not the environment's).

`TextGenerationTask` holds what the single env (`TextGenerationEnv`, here) and the vector env
(`envs.vector.TextGenerationVectorEnv`) share: the tokenizer, the prompts tokenized once, the
reward function and the token budget. Unlike RL4LMs' text env, nothing is re-tokenized per step and
only finished episodes are decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.builtin import BUILTIN_PROMPTS, sentiment_reward
from rlhf_ray.data.records import DataError  # a prompt too long for the context: a user error, never retried
from rlhf_ray.models.loading import load_tokenizer, resolve_model_path
from rlhf_ray.models.tiny import build_tiny_tokenizer
from rlhf_ray.rewards import RewardFunction, RewardSpec, as_reward_function
from rlhf_ray.sampling import end_of_response_ids

NO_PROMPT = -1  # prompt_index of a prompt given explicitly (text or ids) that is not in the env's list


def resolve_tokenizer(tokenizer: Any = None):
    """A tokenizer object: `None` → the built-in tiny tokenizer; a name or folder → `load_tokenizer`."""
    if tokenizer is None:
        return build_tiny_tokenizer()
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a model name or a folder; got {tokenizer!r}")
    return tokenizer


def default_stop_token_ids(tokenizer_spec: Any, tokenizer) -> frozenset[int]:
    """Where an episode ends when the caller does not say: the tokenizer's EOS, and the end-of-turn tokens
    of the model's generation config when the tokenizer was named by a model folder or name."""
    generation_config = None
    if isinstance(tokenizer_spec, (str, os.PathLike)):
        folder = resolve_model_path(tokenizer_spec)
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(folder)
    return end_of_response_ids(tokenizer, generation_config)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True, eq=False)
class TextGenerationTask:
    """The tokenizer, prompts (tokenized once), reward function and token budget of a text env.

    Prompt token ids are stored flat (ragged), so that loading prompts into env slots is a numpy
    gather: `prompt_flat_ids[prompt_offsets[i] : prompt_offsets[i] + prompt_lengths[i]]` is prompt i.
    """

    tokenizer: Any
    prompts: tuple[str, ...]
    prompt_flat_ids: np.ndarray  # (sum of prompt lengths,) int64
    prompt_offsets: np.ndarray  # (num_prompts,) int64
    prompt_lengths: np.ndarray  # (num_prompts,) int64
    reward_fn: RewardFunction
    max_new_tokens: int
    max_length: int  # context limit: prompt + response tokens
    vocab_size: int  # actions are token ids in [0, vocab_size)
    pad_token_id: int  # right-pads observations
    stop_token_ids: frozenset[int]  # tokens that end an episode (terminated); empty: only truncation ends one

    @classmethod
    def build(cls, tokenizer: Any = None, prompts: list[str] | None = None, reward_fn: RewardSpec | None = None,
              max_new_tokens: int = 16, max_length: int | None = None,
              stop_token_ids: Any = None) -> TextGenerationTask:
        spec, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
        stop_token_ids = (default_stop_token_ids(spec, tokenizer) if stop_token_ids is None
                          else frozenset(int(t) for t in stop_token_ids))
        prompts = list(BUILTIN_PROMPTS if prompts is None else prompts)
        if not prompts:
            raise ValueError("prompts is empty; expected at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}] is a {type(prompt).__name__} ({prompt!r}); expected a str")
        reward_fn = as_reward_function(sentiment_reward if reward_fn is None else reward_fn)
        max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")

        vocab_size = len(tokenizer)
        eos_token_id = tokenizer.eos_token_id
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; "
                             "expected one of them to pad observations")

        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]  # tokenized once, here
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        if max_length is None:
            max_length = min(int(tokenizer.model_max_length), int(lengths.max()) + max_new_tokens)
        max_length = _check_positive_int(max_length, "max_length")
        too_long = np.flatnonzero(lengths >= max_length)
        if too_long.size:
            i = int(too_long[0])
            raise DataError(f"prompt {i} ({prompts[i]!r:.80}) has {lengths[i]} tokens, which leaves no room for a "
                             f"new token under max_length={max_length}; expected at most {max_length - 1} tokens")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(lengths.sum()))
        return cls(tokenizer=tokenizer, prompts=tuple(prompts), prompt_flat_ids=flat, prompt_offsets=offsets,
                   prompt_lengths=lengths, reward_fn=reward_fn, max_new_tokens=max_new_tokens,
                   max_length=max_length, vocab_size=vocab_size, pad_token_id=int(pad_token_id),
                   stop_token_ids=stop_token_ids)

    def __post_init__(self):
        object.__setattr__(self, "_prompt_lookup", {p: i for i, p in reversed(list(enumerate(self.prompts)))})
        object.__setattr__(self, "_stop_ids", np.array(sorted(self.stop_token_ids), dtype=np.int64))

    def ends_response(self, tokens: np.ndarray) -> np.ndarray:
        """Which of `tokens` end an episode (terminated), elementwise."""
        if self._stop_ids.size == 1:  # the common case: one comparison, no set lookup
            return tokens == self._stop_ids[0]
        return np.isin(tokens, self._stop_ids)

    def observation_space(self) -> spaces.Dict:
        """Token ids so far, right-padded to `max_length`, with the total and prompt lengths."""
        length = spaces.Box(0, self.max_length, shape=(), dtype=np.int64)
        return spaces.Dict({
            "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(self.max_length,), dtype=np.int64),
            "length": length,
            "prompt_length": length,
        })

    def prompt_ids(self, index: int) -> np.ndarray:
        """The token ids of prompt `index`, shape (P,)."""
        start = self.prompt_offsets[index]
        return self.prompt_flat_ids[start:start + self.prompt_lengths[index]]

    def index_of(self, prompt: str) -> int:
        """The index of `prompt` in the env's prompts, or NO_PROMPT."""
        return self._prompt_lookup.get(prompt, NO_PROMPT)

    def check_prompt_index(self, index: Any, where: str) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.prompts):
            raise ValueError(f"{where} is {index!r}; expected an integer in [0, {len(self.prompts)})")
        return int(index)

    def encode_prompt(self, prompt: Any, where: str) -> np.ndarray:
        """Token ids (P,) of a prompt given as text: the stored ones for a known prompt, else tokenized now."""
        if not isinstance(prompt, str):
            raise TypeError(f"{where} is a {type(prompt).__name__} ({prompt!r:.80}); expected a str")
        index = self.index_of(prompt)
        if index != NO_PROMPT:
            return self.prompt_ids(index)
        ids = np.asarray(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int64)
        return self.check_prompt_ids(ids, where)

    def check_prompt_ids(self, ids: Any, where: str) -> np.ndarray:
        """Prompt token ids as an int64 array (P,), checked against the vocabulary and `max_length`."""
        array = np.asarray(ids)
        if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{where} must be a flat list of integer token ids, got {ids!r:.80}")
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"{where} holds token ids outside [0, {self.vocab_size}): {ids!r:.80}")
        if array.size >= self.max_length:
            raise DataError(f"{where} has {array.size} tokens, which leaves no room for a new token under "
                             f"max_length={self.max_length}; expected at most {self.max_length - 1} tokens")
        return array

    def decode_prompt(self, ids: np.ndarray) -> str:
        # special tokens are kept: they are part of what the policy was given (a chat template, say)
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def decode_responses(self, responses: list[np.ndarray]) -> list[str]:
        return self.tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)


class TextGenerationEnv(gym.Env):
    """One episode = one prompt and its response, one token per step.

    Args:
        tokenizer: a Hugging Face tokenizer, or a model name/folder for `load_tokenizer`;
            default the built-in tiny tokenizer.
        prompts: the prompts an episode starts from; default `envs.builtin.BUILTIN_PROMPTS`.
        reward_fn: anything `rlhf_ray.rewards.as_reward_function` accepts; default `sentiment_reward`.
        max_new_tokens: response token budget.
        max_length: context limit (prompt + response); default
            `min(tokenizer.model_max_length, longest prompt + max_new_tokens)`.
        stop_token_ids: token ids that end an episode (terminated); default the tokenizer's EOS and, when
            `tokenizer` names a model, the end-of-turn ids of its generation config.

    `reset(options=...)` may choose the prompt: `{"prompt_index": int}`, `{"prompt": str}` or
    `{"prompt_ids": list[int]}`; otherwise a prompt is drawn with `self.np_random`.
    """

    # Gymnasium's checker asks for a frame rate wherever render modes exist; text has none to speak of
    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, tokenizer: Any = None, prompts: list[str] | None = None, reward_fn: RewardSpec | None = None,
                 max_new_tokens: int = 16, max_length: int | None = None, render_mode: str | None = None,
                 stop_token_ids: Any = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not supported; expected None or one of "
                             f"{self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.task = TextGenerationTask.build(tokenizer, prompts, reward_fn, max_new_tokens, max_length, stop_token_ids)
        self.tokenizer, self.prompts, self.reward_fn = self.task.tokenizer, self.task.prompts, self.task.reward_fn
        self.max_new_tokens, self.max_length = self.task.max_new_tokens, self.task.max_length
        self.observation_space = self.task.observation_space()
        self.action_space = spaces.Discrete(self.task.vocab_size)

        self.tokens = np.full(self.max_length, self.task.pad_token_id, dtype=np.int64)  # (L,)
        self.length = 0  # prompt + response tokens so far
        self.prompt_length = 0
        self.prompt_index = NO_PROMPT
        self._prompt_text: str | None = None  # None: decode the prompt ids at the end
        self._episode_over = True  # step() needs a reset() first

    @property
    def response_ids(self) -> np.ndarray:
        """The response tokens so far, shape (R,) (a view)."""
        return self.tokens[self.prompt_length:self.length]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"prompt", "prompt_index", "prompt_ids"}
        given = [key for key in ("prompt", "prompt_index", "prompt_ids") if key in options]
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected at most one of "
                             "'prompt', 'prompt_index', 'prompt_ids'")
        if len(given) > 1:
            raise ValueError(f"reset options {given} both choose the prompt; expected at most one of them")

        self._prompt_text = None
        if "prompt" in options:
            ids = self.task.encode_prompt(options["prompt"], "options['prompt']")
            self.prompt_index, self._prompt_text = self.task.index_of(options["prompt"]), options["prompt"]
        elif "prompt_ids" in options:
            ids = self.task.check_prompt_ids(options["prompt_ids"], "options['prompt_ids']")
            self.prompt_index = NO_PROMPT
        else:
            if "prompt_index" in options:
                index = self.task.check_prompt_index(options["prompt_index"], "options['prompt_index']")
            else:
                index = int(self.np_random.integers(len(self.prompts)))
            ids, self.prompt_index, self._prompt_text = self.task.prompt_ids(index), index, self.prompts[index]

        self.tokens[:] = self.task.pad_token_id
        self.tokens[:ids.size] = ids
        self.length = self.prompt_length = int(ids.size)
        self._episode_over = False
        return self._observation(), {"prompt_index": self.prompt_index}

    def step(self, action: Any):
        if self._episode_over:
            raise RuntimeError("step() called after the episode ended (or before the first reset); call reset() first")
        token = self._check_action(action)
        self.tokens[self.length] = token
        self.length += 1
        response_length = self.length - self.prompt_length
        terminated = token in self.task.stop_token_ids
        # an EOS that also uses up the budget counts as terminated: the policy chose to stop
        truncated = not terminated and (response_length >= self.max_new_tokens or self.length >= self.max_length)
        reward, info = 0.0, {}
        if terminated or truncated:
            self._episode_over = True
            prompt = self._prompt_text if self._prompt_text is not None else self.task.decode_prompt(
                self.tokens[:self.prompt_length])
            response = self.task.decode_responses([self.response_ids])[0]
            reward = float(self.reward_fn([prompt], [response])[0])
            info = {"prompt": prompt, "response": response, "prompt_index": self.prompt_index,
                    "response_length": response_length}
        return self._observation(), reward, bool(terminated), bool(truncated), info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            prompt = self.task.decode_prompt(self.tokens[:self.prompt_length])
            return f"{prompt} | {self.task.decode_responses([self.response_ids])[0]}"
        return None

    def _check_action(self, action: Any) -> int:
        array = np.asarray(action)
        if array.shape != () or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"action must be one integer token id in [0, {self.task.vocab_size}), got {action!r}")
        if not 0 <= array < self.task.vocab_size:
            raise ValueError(f"action {int(array)} is not a token id: "
                             f"expected an integer in [0, {self.task.vocab_size})")
        return int(array)

    def _observation(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.tokens.copy(),  # (L,)
            "length": np.array(self.length, dtype=np.int64),
            "prompt_length": np.array(self.prompt_length, dtype=np.int64),
        }
