"""Reward functions: one protocol, adapters to it, and the checks every score goes through.

A reward function scores finished episodes in a batch:

    scores = reward(prompts: list[str], responses: list[str])  # np.ndarray float64, shape (n,)

`as_reward_function` turns what a user writes into such a function: a Python callable, an import
string `"package.module:function"` (what a YAML config holds), or the folder of a Hugging Face
sequence-classification reward model (`rlhf_ray.rewards.reward_model.RewardModelScorer`). Every
adapter is a `RewardFunction`, which names the reward and checks what it returned: one finite score
per item. A NaN reward would silently poison every PPO statistic downstream (advantage whitening
divides by the batch's standard deviation), so it is an error here, at its source, naming the
reward and the item.
"""

from __future__ import annotations

import importlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from rlhf_ray.errors import RewardError


@dataclass(frozen=True)
class RewardScores:
    """What a reward gives for a batch of n pairs: the total (n,) that the policy is trained on and, for a
    composite reward, each component's unweighted scores (n,) by name (logged as `reward/<name>`)."""

    total: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)

    def per_item(self) -> list[dict[str, float]] | None:
        """Item i's components as {name: score}, for each item; None without components."""
        if not self.components:
            return None
        return [{name: float(scores[i]) for name, scores in self.components.items()} for i in range(len(self.total))]


def _callable_name(fn: Callable) -> str:
    """`module:qualname` of a function, or the type name of another callable object."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return type(fn).__name__


def _as_scores(raw: Any) -> np.ndarray:
    """A numpy float64 array of what a reward function returned (list, numpy array or torch tensor)."""
    if hasattr(raw, "detach") and hasattr(raw, "cpu"):  # a torch tensor, without importing torch here
        raw = raw.detach().cpu().float().numpy()
    return np.asarray(raw, dtype=np.float64)


class _DaemonCaller:
    """One daemon thread that runs calls handed to it, one at a time; the caller waits a bounded time."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, outcome, finished = self._calls.get()
            try:
                outcome["value"] = fn(*args)
            except BaseException as error:  # handed to the caller's thread
                outcome["error"] = error
            finally:
                finished.set()

    def call(self, fn, args: tuple, timeout_s: float) -> dict | None:
        """{"value": ...} or {"error": ...} of `fn(*args)`; None when it did not finish within `timeout_s`."""
        outcome, finished = {}, threading.Event()
        self._calls.put((fn, args, outcome, finished))
        return outcome if finished.wait(timeout_s) else None


class RewardFunction:
    """A named reward function whose output is checked: shape (n,), finite, float64.

    Wraps `fn(prompts, responses)`, which may return a list, a numpy array or a torch tensor.
    An exception raised inside `fn` becomes a `RewardError` naming the reward and the batch (the original
    is its `__cause__`): the user's code failing is a user error, which ends a run without a retry.
    """

    def __init__(self, fn: Callable[[list[str], list[str]], Any], name: str | None = None,
                 timeout_s: float | None = None):
        if not callable(fn):
            raise RewardError(f"a reward function must be callable, got {type(fn).__name__}: {fn!r}")
        self.fn = fn
        self.name = name or _callable_name(fn)
        self.timeout_s = timeout_s  # None: no bound (a plain function call)
        self._caller: _DaemonCaller | None = None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """The scores (n,) of the pairs."""
        return self.score(prompts, responses).total

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardScores:
        """The scores (n,) of the pairs, with the components of a composite reward (whose function returns
        a `RewardScores`); the total is checked, each component by its own `RewardFunction`."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"reward {self.name!r} was given {len(prompts)} prompts but {len(responses)} responses; "
                             "expected one response per prompt")
        n = len(prompts)
        if n == 0:
            return RewardScores(np.zeros(0, dtype=np.float64))
        try:
            raw = self._bounded_call(prompts, responses)
        except RewardError:
            raise
        except Exception as error:  # the user's code failed: a user error, never retried (rlhf_ray.errors)
            raise RewardError(f"reward {self.name!r} raised {type(error).__name__}: {error} "
                              f"(scoring a batch of {n} (prompt, response) pairs)") from error
        components = {}
        if isinstance(raw, RewardScores):
            raw, components = raw.total, raw.components
        try:
            scores = _as_scores(raw)
        except (TypeError, ValueError) as error:
            raise RewardError(f"reward {self.name!r} returned {type(raw).__name__} {raw!r:.200}, which is not "
                              f"a sequence of numbers; expected {n} float scores") from error
        if scores.shape != (n,):
            raise RewardError(f"reward {self.name!r} returned scores of shape {scores.shape} for {n} "
                              f"(prompt, response) pairs; expected shape ({n},), one score per pair")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardError(
                f"reward {self.name!r} returned a non-finite score ({scores[i]}) for item {i} "
                f"(prompt {prompts[i]!r:.80}, response {responses[i]!r:.80}); "
                f"{bad.size} of {n} scores are non-finite, expected all finite"
            )
        return RewardScores(scores, components)

    def _bounded_call(self, prompts: list[str], responses: list[str]) -> Any:
        """`fn(prompts, responses)`, given at most `timeout_s` seconds when that is set.

        The call runs on the reward's own daemon thread (one per `RewardFunction`, started once: a
        thread per call would cost ~0.1 ms on every decoding step that finishes an episode). A call
        that hangs (a remote reward service that never answers) keeps its thread, which is abandoned:
        the run fails naming the reward instead of stalling, and the process can still exit.
        """
        if self.timeout_s is None:
            return self.fn(prompts, responses)
        if self._caller is None:
            self._caller = _DaemonCaller(f"reward-{self.name}")
        outcome = self._caller.call(self.fn, (prompts, responses), self.timeout_s)
        if outcome is None:
            self._caller = None  # stuck in the user's function: the next call gets a fresh thread
            raise RewardError(f"reward {self.name!r} did not return within reward.timeout_s={self.timeout_s:g} s "
                              f"for a batch of {len(prompts)} (prompt, response) pairs")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def __getstate__(self) -> dict:  # a thread does not pickle; a copy starts its own on first use
        return {**self.__dict__, "_caller": None}

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"


RewardSpec = Union[RewardFunction, Callable[[list[str], list[str]], Any], str, os.PathLike]


def import_from_string(spec: str) -> Any:
    """The object named by `"package.module:attribute"` (the attribute may be dotted: `"mod:Class.method"`)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise RewardError(f"reward {spec!r} is not an import string; expected 'package.module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({error}); "
                          "expected 'package.module:function' with an importable module") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    return target


def as_reward_function(spec: RewardSpec, *, name: str | None = None, batch_size: int = 32,
                       device: str = "cpu") -> RewardFunction:
    """A `RewardFunction` from a callable, an import string, or a reward-model folder.

    - `RewardFunction`: returned as it is (renamed if `name` is given);
    - a callable `fn(prompts, responses)`: wrapped;
    - `"package.module:function"`: imported, then wrapped;
    - a local folder holding a Hugging Face sequence-classification model with one label: scored by
      `RewardModelScorer(folder, batch_size=batch_size, device=device)`.
    """
    if isinstance(spec, RewardFunction):
        return spec if name is None else RewardFunction(spec.fn, name)
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            from rlhf_ray.rewards.reward_model import RewardModelScorer

            return RewardFunction(RewardModelScorer(path, batch_size=batch_size, device=device), name or text)
        if ":" in text and not path.exists():
            fn = import_from_string(text)
            if not callable(fn):
                raise RewardError(f"reward {text!r} names a {type(fn).__name__}, not a function; "
                                  "expected a callable fn(prompts, responses) -> scores")
            return RewardFunction(fn, name or text)
        raise RewardError(f"reward {text!r} is neither an import string 'package.module:function' nor a "
                          "reward-model folder (a directory written by save_pretrained)")
    if callable(spec):
        return RewardFunction(spec, name)
    raise RewardError(f"cannot make a reward function of {type(spec).__name__} {spec!r}; expected a callable, "
                      "an import string 'package.module:function', or a reward-model folder")
