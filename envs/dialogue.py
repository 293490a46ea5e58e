"""Multi-turn episodes: a conversation in which one action is one token of the assistant's turn.

An episode starts from a prompt (the opening of a conversation, rendered in the chat template up to
the assistant's generation prompt). The policy writes its turn a token at a time; the turn ends with an
end-of-response token (the chat template's end of turn, or EOS) or the per-turn budget. Then the
task's responder, a scripted user or a tool, answers: its message is rendered in the chat template
(what closes the assistant's turn, the message, the next generation prompt), tokenized once, and
appended; those tokens are context, not actions (`action_mask` 0). The episode ends when the responder
ends the conversation (terminated: the goal is met, or the user leaves), or at `max_turns` assistant
turns or `max_length` tokens (truncated). The reward is the reward function's score of the prompt and
the whole conversation after it (`transcript`), at the end, plus any reward a reply gives the turn it answers
(`Reply.reward`, a per-turn reward: the step's reward, and `turn_reward` in the infos).

Nothing is decoded and re-encoded between turns: the token ids of an episode are the policy's actions
and the ids of the environment's messages, each message encoded once, so the learner trains on exactly
the ids the sampler produced and the environment appended (re-tokenization drift breaks multi-turn RL).

Tasks (a `DialogueTask` has `reply(prompt, turns) -> Reply | None`; the reward is a function with the
project's signature over the transcript):
- `refund`: a customer who wants a refund for an order whose number only they know. They give it when
  the assistant asks for the order (or its number), are done once the assistant grants the refund after
  that, and leave at a rude word. `refund_reward`: 1 for a refund granted, 0.3 for the number obtained
  only, +0.2 when the refund names the order number, -0.1 per turn beyond the two it needs, and the
  customer's judgement of politeness (a `SimulatedPerson`, as on the feedback pages) up to +0.1.
- `calculator`: "what is 37 * 24 ?"; the assistant may call a calculator as `call 37 * 24` (one call a
  turn, the whole turn) and reads `<|tool|> 888`, or `<|tool|> error` and a turn reward of -0.1 for an operand
  of more than six digits; a turn without a call is its answer. `calculator_reward`: 1 when the answer's last
  number is the result, -0.05 per call beyond one.

`python -c "import envs, gymnasium; ..."`: `gymnasium.make("rlhf_ray/Dialogue-v0")` is the refund task on
the built-in task tokenizer; `make_vec(..., vectorization_mode="vector_entry_point")` its vector env.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

# the tasks' names are this module's too: configs name them here (envs.dialogue:refund_reward)
from envs.dialogue_tasks import (
    ROLES, TASKS, Calculator, ChatFormat, DialogueTask, RefundCustomer, Reply, calculator_prompts,
    calculator_question, calculator_reward, load_task, order_number, polite_score, refund_prompts, refund_reward,
    refund_state, refund_success, split_turns, task_name,
)
from envs.text_generation import TextGenerationTask, default_stop_token_ids, resolve_tokenizer
from envs.vector import TextGenerationVectorEnv
from rlhf_ray.data.chat import format_prompt
from rlhf_ray.errors import TaskError
from rlhf_ray.rewards import RewardSpec

__all__ = [
    "Calculator", "ChatFormat", "DialogueEnv", "DialogueTask", "DialogueVectorEnv", "RefundCustomer", "Reply",
    "calculator_prompts", "calculator_question", "calculator_reward", "load_task", "order_number", "polite_score",
    "refund_prompts", "refund_reward", "refund_state", "refund_success", "split_turns",
]


class DialogueVectorEnv(TextGenerationVectorEnv):
    """`num_envs` conversations as arrays (`envs.vector.TextGenerationVectorEnv`'s state and reset).

    Args beyond the text env's: `task` (`load_task`), `max_turns` (assistant turns per episode),
    `max_env_tokens` (the tokens appended after one assistant turn: a message and the template's marks
    around it; more is the task's error). `max_new_tokens` is
    the budget of one assistant turn; `max_length` the whole conversation's, by default the longest prompt
    plus `max_turns` turns and the messages between them. `reward_fn` scores (prompt, transcript).

    The observation adds `action_mask` (L,): 1 on the assistant's tokens. Infos of a step: for each env
    whose turn ended and whose conversation goes on, `appended` (the token ids added after its last action:
    the rest of the turn end, the message, the next generation prompt); for each finished one, `prompt`,
    `response` (the transcript), `turns` ([{role, content}]) and the text env's keys.
    """

    def __init__(self, num_envs: int = 1, tokenizer: Any = "rlhf-ray/tiny-chat-gpt2",
                 prompts: list[str] | None = None, task: Any = "refund", reward_fn: RewardSpec | None = None,
                 max_new_tokens: int = 8, max_turns: int = 3, max_env_tokens: int = 24,
                 max_length: int | None = None, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 copy: bool = True, stop_token_ids: Any = None):
        self.dialogue, self.task_name = load_task(task), task_name(task)
        self.max_turns = _positive(max_turns, "max_turns")
        self.max_env_tokens = _positive(max_env_tokens, "max_env_tokens")
        builtin = task if isinstance(task, str) and task in TASKS else None
        if prompts is None:
            if builtin is None:
                raise ValueError("a dialogue task other than the built-in ones needs its prompts")
            prompts = refund_prompts() if builtin == "refund" else calculator_prompts()
        if reward_fn is None:
            if builtin is None:
                raise ValueError("a dialogue task other than the built-in ones needs its reward_fn")
            reward_fn = refund_reward if builtin == "refund" else calculator_reward
        spec, tokenizer = tokenizer, resolve_tokenizer(tokenizer)
        self.format = ChatFormat.of(tokenizer)
        if stop_token_ids is None:  # EOS, the model's end-of-turn ids, and the template's end of turn when one token
            stop_token_ids = set(default_stop_token_ids(spec, tokenizer))
            end = tokenizer(self.format.turn_end.strip(), add_special_tokens=False)["input_ids"]
            stop_token_ids.update(end[:1] if len(end) == 1 else [])
        # plain opening messages become the user's turn; a prompt already rendered in the template stays as it is
        prompts = [format_prompt(tokenizer, prompt, chat=True) for prompt in prompts]
        probe = TextGenerationTask.build(tokenizer, prompts, reward_fn, max_new_tokens, 10**9, stop_token_ids)
        if max_length is None:
            max_length = int(probe.prompt_lengths.max()) + self.max_turns * max_new_tokens + (
                self.max_turns - 1) * self.max_env_tokens
        super().__init__(num_envs, tokenizer, prompts, probe.reward_fn, max_new_tokens, max_length,
                         autoreset_mode, copy, probe.stop_token_ids)
        self.single_observation_space = spaces.Dict({
            **self.single_observation_space.spaces,
            "action_mask": spaces.Box(0, 1, shape=(self.max_length,), dtype=np.int8)})
        from gymnasium.vector.utils import batch_space

        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        n = self.num_envs
        self.action_mask = np.zeros((n, self.max_length), dtype=np.int8)  # (N, L)
        self.turn_start = np.zeros(n, dtype=np.int64)  # (N,) where the assistant's current turn began
        self.turns: list[list[tuple[str, str]]] = [[] for _ in range(n)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if options and "prompts" in options and not isinstance(options["prompts"], (str, bytes)):
            # plain opening messages become the user's turn, as the env's own prompts do
            options = {**options, "prompts": [format_prompt(self.tokenizer, p, chat=True) if isinstance(p, str) else p
                                              for p in options["prompts"]]}
        observations, infos = super().reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask")
        envs = np.flatnonzero(mask) if mask is not None else np.arange(self.num_envs)
        self._start(envs)
        return self._observations(), infos

    def _start(self, envs: np.ndarray) -> None:
        self.action_mask[envs] = 0
        self.turn_start[envs] = self.lengths[envs]
        for env in envs:
            self.turns[env] = []

    def _load_prompt_indices(self, envs: np.ndarray, indices: np.ndarray) -> None:
        super()._load_prompt_indices(envs, indices)
        if hasattr(self, "turns"):  # an autoreset (NEXT_STEP) starts conversations here
            self._start(envs)

    def step(self, actions: Any):
        stepping, tokens, active = self._append_actions(actions)
        self.action_mask[stepping, self.lengths[stepping] - 1] = 1
        n = self.num_envs
        stop = np.zeros(n, dtype=bool)
        stop[stepping] = self.task.ends_response(tokens)
        turn_over = active & (stop | (self.lengths - self.turn_start >= self.max_new_tokens)
                              | (self.lengths >= self.max_length))
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        appended = np.full(n, None, dtype=object)
        turn_rewards = np.zeros(n, dtype=np.float64)
        for env in np.flatnonzero(turn_over):
            ids = self.tokens[env, self.turn_start[env]:self.lengths[env]]
            self.turns[env].append(("assistant", self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()))
            reply = self._reply(env)
            if reply is None:  # the user is done (the goal met, or they left), or the tool's task is answered
                terminated[env] = True
                continue
            turn_rewards[env] = reply.reward
            if sum(role == "assistant" for role, _ in self.turns[env]) >= self.max_turns:
                truncated[env] = True
                continue
            stop_text = self.tokenizer.decode([int(ids[-1])]) if stop[env] else None
            text = self.format.after_turn(stop_text) + self.format.message(reply.role, reply.content)
            new = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            if new.size > self.max_env_tokens:
                raise TaskError(f"dialogue task {self.task_name!r}: a {reply.role} message of {new.size} tokens "
                                f"with the template's marks ({reply.content!r:.80}); rollout.dialogue.max_env_tokens "
                                f"is {self.max_env_tokens}")
            if self.lengths[env] + new.size >= self.max_length:  # no room for the reply and a token after it
                truncated[env] = True
                continue
            self.tokens[env, self.lengths[env]:self.lengths[env] + new.size] = new
            self.lengths[env] += new.size
            self.turn_start[env] = self.lengths[env]
            self.turns[env].append((reply.role, reply.content))
            appended[env] = new
        finished = terminated | truncated
        self.ended |= finished
        rewards = turn_rewards.copy()
        infos: dict[str, Any] = {}
        has_appended = np.array([a is not None for a in appended])
        if has_appended.any():
            infos["appended"], infos["_appended"] = appended, has_appended
        if turn_rewards.any():
            infos["turn_reward"], infos["_turn_reward"] = turn_rewards, turn_rewards != 0
        if finished.any():
            scores, scored = self._score(np.flatnonzero(finished), finished)
            rewards += scores
            turns = np.full(n, None, dtype=object)
            for env in np.flatnonzero(finished):
                turns[env] = [{"role": role, "content": text} for role, text in self.turns[env]]
            infos.update(scored, turns=turns, _turns=finished.copy())
        return self._observations(), rewards, terminated, truncated, infos

    def _reply(self, env: int) -> Reply | None:
        """The task's answer to env `env`'s last turn, checked: a `TaskError` names the task and what went wrong."""
        prompt = self._prompt_text(env)
        try:
            reply = self.dialogue.reply(prompt, list(self.turns[env]))
        except Exception as error:
            raise TaskError(f"dialogue task {self.task_name!r} raised {type(error).__name__}: {error} (replying to "
                            f"turn {len(self.turns[env])} of the conversation opened by {prompt!r:.80})") from error
        if reply is not None and not (isinstance(reply, Reply) and reply.role in ROLES and isinstance(reply.content, str)
                                      and isinstance(reply.reward, (int, float)) and np.isfinite(reply.reward)):
            raise TaskError(f"dialogue task {self.task_name!r} returned {reply!r:.80}; expected None (the "
                            f"conversation is over) or Reply(role, content, reward) with a role in {ROLES}, str "
                            "content and a finite reward")
        return reply

    def _response_texts(self, envs: np.ndarray) -> list[str]:
        return [self.format.transcript(self.turns[env]) for env in envs]

    def _observations(self) -> dict[str, np.ndarray]:
        observations = super()._observations()
        if hasattr(self, "action_mask"):
            observations["action_mask"] = self.action_mask.copy() if self.copy else self.action_mask
        return observations


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class DialogueEnv(gym.Env):
    """One conversation at a time: `DialogueVectorEnv` with one env, as a Gymnasium `Env` (same arguments)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not supported; expected None or 'ansi'")
        self.render_mode = render_mode
        self.vector = DialogueVectorEnv(num_envs=1, autoreset_mode=AutoresetMode.DISABLED, **kwargs)
        self.observation_space = self.vector.single_observation_space
        self.action_space = self.vector.single_action_space
        self._over = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"prompt", "prompt_index", "prompt_ids"}
        if unknown or len(options) > 1:
            raise ValueError(f"reset options {sorted(options)}: expected at most one of 'prompt', 'prompt_index', "
                             "'prompt_ids'")
        if "prompt_index" in options:
            index = self.vector.task.check_prompt_index(options["prompt_index"], "options['prompt_index']")
        elif not options:
            index = int(self.np_random.integers(len(self.vector.prompts)))
        vector_options = ({"prompt_indices": np.array([index])} if not options or "prompt_index" in options
                          else {"prompts": [options["prompt"]]} if "prompt" in options
                          else {"prompt_ids": [options["prompt_ids"]]})
        observations, infos = self.vector.reset(options=vector_options)
        self._over = False
        return _first(observations), {key: value[0] for key, value in infos.items() if not key.startswith("_")}

    def step(self, action: Any):
        if self._over:
            raise RuntimeError("step() called after the episode ended (or before the first reset); call reset() first")
        array = np.asarray(action)
        if array.shape != () or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"action must be one integer token id, got {action!r}")
        observations, rewards, terminated, truncated, infos = self.vector.step(array.reshape(1))
        self._over = bool(terminated[0] or truncated[0])
        info = {key: value[0] for key, value in infos.items() if not key.startswith("_") and infos[f"_{key}"][0]}
        return _first(observations), float(rewards[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        vector = self.vector
        return vector._prompt_text(0) + vector.format.transcript(vector.turns[0])


def _first(observations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(value[0]) for key, value in observations.items()}
