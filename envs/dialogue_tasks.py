"""The chat format of multi-turn episodes and their tasks (`envs.dialogue` runs them as Gymnasium envs).

A task answers the assistant's last turn: `reply(prompt, turns) -> Reply | None`. Its reward is a function
with the project's signature over the transcript (`ChatFormat.transcript`, parsed back by `split_turns`).
The built-in tasks, `refund` and `calculator`, are described in `envs.dialogue`'s docstring.
"""

from __future__ import annotations

import importlib
import random
import re
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rlhf_ray.errors import TaskError

ROLES = ("user", "tool")  # who answers the assistant


@dataclass(frozen=True)
class Reply:
    role: str  # "user" or "tool"
    content: str
    reward: float = 0.0  # a reward for the assistant's turn this answers (per turn; the step's reward in the env)


class DialogueTask(Protocol):
    def reply(self, prompt: str, turns: list[tuple[str, str]]) -> Reply | None:
        """The next message after the assistant's last turn, or None: the conversation is over.
        `turns`: (role, text) of every turn after the prompt, the assistant's last one included."""


# ---------------------------------------------------------------------------------------------- chat format

_MARK = "\x00turn-text\x00"


@dataclass(frozen=True)
class ChatFormat:
    """How a chat template writes one message, found by rendering it with marker texts (any template that
    renders a conversation as its messages one after another)."""

    prefixes: dict  # role -> text before a message's content ("<|im_start|>user\n")
    turn_end: str  # text after a message's content ("<|im_end|>\n")
    generation_prompt: str  # what opens the assistant's turn ("<|im_start|>assistant\n")

    @classmethod
    def of(cls, tokenizer) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("a dialogue needs a tokenizer with a chat template (roles and an end of turn); "
                             "this one has none (the task tokenizer `rlhf-ray/tiny-chat-gpt2` has one)")

        def render(messages, generation_prompt=False):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

        opening = [{"role": "user", "content": "hi"}]
        base = render(opening)
        prompt = render(opening, True)
        if not prompt.startswith(base):
            raise ValueError("the chat template does not render a conversation as its messages one after another")
        prefixes, turn_end = {}, None
        for role in ("assistant", *ROLES):
            text = render(opening + [{"role": role, "content": _MARK}])
            if not text.startswith(base) or _MARK not in text:
                raise ValueError(f"the chat template does not render a {role!r} message after a user's")
            before, after = text[len(base):].split(_MARK)
            prefixes[role] = before
            turn_end = after if turn_end is None else turn_end
        return cls(prefixes=prefixes, turn_end=turn_end, generation_prompt=prompt[len(base):])

    def after_turn(self, stop_text: str | None) -> str:
        """What closes the assistant's turn when it ended with a token of text `stop_text` (None: cut by the
        budget): the rest of the template's turn end."""
        end = self.turn_end
        if stop_text and end.lstrip().startswith(stop_text):
            return end.lstrip()[len(stop_text):]
        return end

    def message(self, role: str, content: str) -> str:
        """One message of `role` and the assistant's generation prompt after it."""
        return f"{self.prefixes[role]}{content}{self.turn_end}{self.generation_prompt}"

    def transcript(self, turns: list[tuple[str, str]]) -> str:
        """The conversation after the prompt as the template writes it: the first turn is the assistant's,
        whose opening the prompt holds."""
        parts = [turns[0][1]] if turns else []
        for role, content in turns[1:]:
            parts.append(f"{self.turn_end}{self.prefixes[role]}{content}")
        return "".join(parts)


_ROLE_MARK = re.compile(r"<\|(?:im_start\|>)?(system|user|assistant|tool)(?:\|>)?\s*")
_END_MARK = re.compile(r"<\|(?:end|im_end)\|>|<eos>|</s>|<\|endoftext\|>")


def split_turns(transcript: str) -> list[tuple[str, str]]:
    """(role, text) of each turn of a transcript (`ChatFormat.transcript`, or a conversation decoded with
    its special tokens), the first turn the assistant's. Knows the task tokenizer's `<|user|> ... <|end|>`
    and ChatML's `<|im_start|>user\\n ... <|im_end|>`."""
    chunks = _END_MARK.split(transcript)
    if len(chunks) > 1 and not chunks[-1].strip():  # what follows the last end of turn
        chunks.pop()
    turns = []
    for i, chunk in enumerate(chunk.strip() for chunk in chunks):
        match = _ROLE_MARK.match(chunk)
        if match:
            turns.append((match.group(1), chunk[match.end():].strip()))
        elif i == 0 or chunk:  # the assistant's first turn has no role mark (the prompt opened it)
            turns.append(("assistant", chunk))
    return turns


# ---------------------------------------------------------------------------------------------- tasks

_WORDS = re.compile(r"[a-z]+|\d")
RUDE_WORDS = frozenset({"hate", "bad", "stupid", "idiot", "shut"})
POLITE_WORDS = frozenset({"please", "thanks", "thank", "sorry", "welcome", "glad", "happy"})


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def order_number(prompt: str) -> str:
    """The order number the customer of `prompt` has in mind (three digits, fixed by the prompt's text)."""
    opening = _user_text(prompt)
    return str(100 + zlib.crc32(opening.encode()) % 900)


def _user_text(prompt: str) -> str:
    """The last user message of a rendered prompt (the whole prompt when it has no role marks)."""
    turns = split_turns(prompt)
    users = [text for role, text in turns if role == "user"]
    return users[-1] if users else prompt.strip()


def _digits(text: str) -> str:
    return "".join(re.findall(r"\d", text))


@dataclass
class _RefundState:
    number: str
    given: bool = False  # the customer gave the order number
    refunded: bool = False  # the assistant granted the refund after that
    named: bool = False  # ... naming the order number
    left: bool = False  # the customer left (a rude word)
    turns: int = 0  # assistant turns


def refund_state(prompt: str, assistant_turns: list[str]) -> _RefundState:
    """Replay the customer's side of a conversation: what they gave, got and did after each assistant turn."""
    state = _RefundState(order_number(prompt))
    for text in assistant_turns:
        state.turns += 1
        words = set(_words(text))
        if words & RUDE_WORDS:
            state.left = True
            break
        if state.given and words & {"refund", "refunded", "refunding"}:
            state.refunded, state.named = True, state.number in _digits(text)
            break
        if not state.given and words & {"order", "number"}:
            state.given = True
    return state


class RefundCustomer:
    """The scripted customer of the `refund` task; see the module's docstring."""

    def reply(self, prompt: str, turns: list[tuple[str, str]]) -> Reply | None:
        said = [text for role, text in turns if role == "assistant"]
        state = refund_state(prompt, said)
        if state.left or state.refunded:
            return None
        if state.given and not refund_state(prompt, said[:-1]).given:  # asked for it just now
            return Reply("user", f"it is {state.number}")
        if state.given:
            return Reply("user", "please give me my refund")
        return Reply("user", "i want a refund for my order")


REFUND_OPENINGS = [f"{greeting}{request}{item}{manner}"
                   for greeting in ("", "hi , ", "hello , ")
                   for request in ("i want a refund", "can i get my money back", "i need a refund",
                                   "i want my money back")
                   for item in ("", " for my order", " of my order")
                   for manner in ("", " please")]


def refund_prompts(split: str = "train") -> list[str]:
    """The customers' opening messages: 72 in all, one in six held out (every sixth, so both splits mix every
    wording)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [text for i, text in enumerate(REFUND_OPENINGS) if (i % 6 == 5) == (split == "heldout")]


def polite_score(prompts: list[str], responses: list[str]) -> np.ndarray:
    """The share of the assistant's turns with a polite word (a customer's sense of being treated well)."""
    scores = []
    for response in responses:
        turns = [text for role, text in split_turns(response) if role == "assistant"]
        scores.append(np.mean([bool(set(_words(t)) & POLITE_WORDS) for t in turns]) if turns else 0.0)
    return np.array(scores, dtype=np.float64)


def refund_reward(prompts: list[str], responses: list[str], politeness_noise: float = 0.0,
                  seed: int = 0) -> np.ndarray:
    """The refund task's score of each conversation; see the module's docstring. The politeness term is the
    judgement of a simulated customer (`rlhf_ray.simulated_users.SimulatedPerson` over `polite_score`) with
    Gaussian noise `politeness_noise` (0: the score itself)."""
    from rlhf_ray.simulated_users import SimulatedPerson

    customer = SimulatedPerson("customer", "", polite_score, noise=politeness_noise, rng=random.Random(seed))
    scores = []
    for prompt, response in zip(prompts, responses):
        state = refund_state(prompt, [text for role, text in split_turns(response) if role == "assistant"])
        score = 1.0 if state.refunded else 0.3 if state.given else 0.0
        if state.refunded:
            score += 0.2 * state.named
        score -= 0.1 * max(0, state.turns - 2)
        score += 0.1 * min(1.0, max(0.0, customer.worth(prompt, response)))
        scores.append(0.0 if state.left else score)
    return np.array(scores, dtype=np.float64)


def refund_success(prompts: list[str], responses: list[str]) -> np.ndarray:
    """1 where the customer got the refund (the goal), else 0: the held-out success rate's measure."""
    return np.array([float(refund_state(p, [t for role, t in split_turns(r) if role == "assistant"]).refunded)
                     for p, r in zip(prompts, responses)], dtype=np.float64)


_CALL = re.compile(r"\bcall\s*(\d[\d ]*?)\s*([-+*])\s*(\d[\d ]*)", re.IGNORECASE)
_QUESTION = re.compile(r"what is\s*(\d[\d ]*?)\s*([-+*])\s*(\d[\d ]*?)\s*\?")


def _evaluate(a: str, op: str, b: str) -> int:
    x, y = int(_digits(a)), int(_digits(b))
    return x + y if op == "+" else x - y if op == "-" else x * y


class Calculator:
    """The tool of the `calculator` task: a turn `call A op B` gets `<|tool|> result`; any other turn is the
    assistant's answer, which ends the conversation."""

    def reply(self, prompt: str, turns: list[tuple[str, str]]) -> Reply | None:
        match = _CALL.search(turns[-1][1])
        if match is None:
            return None
        a, op, b = match.groups()
        if max(len(_digits(a)), len(_digits(b))) > 6:  # the calculator's display: six digits an operand
            return Reply("tool", "error", reward=-0.1)
        return Reply("tool", str(_evaluate(a, op, b)))


def calculator_question(prompt: str) -> int:
    matches = list(_QUESTION.finditer(_user_text(prompt)))
    if not matches:
        raise ValueError(f"not a calculator prompt (no 'what is A op B ?'): {prompt!r:.200}")
    return _evaluate(*matches[-1].groups())


def calculator_reward(prompts: list[str], responses: list[str]) -> np.ndarray:
    """1 when the last assistant turn (not a call) ends with the result, -0.05 per call beyond one."""
    scores = []
    for prompt, response in zip(prompts, responses):
        assistant = [text for role, text in split_turns(response) if role == "assistant"]
        calls = sum(bool(_CALL.search(t)) for t in assistant)
        answer = assistant[-1] if assistant and not _CALL.search(assistant[-1]) else ""
        numbers = re.findall(r"\d[\d ]*", answer)
        right = bool(numbers) and _digits(numbers[-1]) == str(calculator_question(prompt))
        scores.append(float(right) - 0.05 * max(0, calls - 1))
    return np.array(scores, dtype=np.float64)


def calculator_prompts(split: str = "train", count: int = 64, seed: int = 0) -> list[str]:
    """'what is A * B ?' with A in 10..99 and B in 2..9: train and held-out draw from disjoint pairs (held out:
    A + B a multiple of 5)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    prompts, seen = [], set()
    while len(prompts) < count:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        if (a, b) in seen or ((a + b) % 5 == 0) != (split == "heldout"):
            continue
        seen.add((a, b))
        prompts.append(f"what is {a} * {b} ?")
    return prompts


TASKS = {"refund": RefundCustomer, "calculator": Calculator}


def load_task(spec: Any) -> DialogueTask:
    """A task object: itself, a built-in name (`refund`, `calculator`), or `module:name` of a task class or
    object (a class is instantiated with no arguments). What cannot be loaded is a `TaskError` naming it."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "reply", None)):
            raise TaskError(f"dialogue task {spec!r:.80} has no reply(prompt, turns) method")
        return spec
    if spec in TASKS:
        return TASKS[spec]()
    module_name, sep, name = spec.partition(":")
    if not sep:
        raise TaskError(f"dialogue task {spec!r}: expected a built-in task ({', '.join(TASKS)}) or 'module:name'")
    try:
        found = getattr(importlib.import_module(module_name), name)
        task = found() if isinstance(found, type) else found
    except Exception as error:  # an import, a missing name, a constructor that raises: the same every time
        raise TaskError(f"dialogue task {spec!r} cannot be loaded: {type(error).__name__}: {error}") from error
    if not callable(getattr(task, "reply", None)):
        raise TaskError(f"dialogue task {spec!r} has no reply(prompt, turns) method")
    return task


def task_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else type(spec).__name__
