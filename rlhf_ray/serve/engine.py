"""The policy server's engine: requests are decoded together, each joining the running batch as soon as a
row is free (continuous batching), on the same decoder as rollouts (`rlhf_ray.decoding.DecodeBatch`).

A step (`GenerationEngine.step`) lets new sequences join and cancelled ones leave, draws every running
sequence's next token and turns it into text, then runs one decoding forward pass. What each sequence
keeps of its own:

- its `max_new_tokens`, temperature (0: greedy), top-p and stop strings; it finishes on its own, at an
  end-of-response token (`rlhf_ray.sampling.end_of_response_ids`: the same tokens that end a rollout
  episode), a stop string or its token budget, and its row is free for the next sequence;
- its randomness, `episode_uniforms([seed])`, a stream of its seed alone: a request with a `seed` gets the
  same completion whichever requests share its batch, and the same as the rollout sampler makes from that
  seed (`sample_tokens` is the sampler's draw too);
- its text, detokenised one piece per step (`rlhf_ray.serve.text`).

The replica's asynchronous loop around `step` is `rlhf_ray.serve.decode_loop`; `stream` and `generate`
run requests to the end in this thread (tests, benchmarks). Torch only: no Ray, no gymnasium.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator

import numpy as np
import torch

from rlhf_ray.decoding import DecodeBatch
from rlhf_ray.sampling import end_of_response_ids, episode_uniforms, sample_tokens
from rlhf_ray.serve.prompts import PromptCodec
from rlhf_ray.serve.prompts import context_length as config_context_length
from rlhf_ray.serve.text import ResponseText, TextDelta

__all__ = ["Generation", "GenerationEngine", "GenerationRequest", "TextDelta"]


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to sample (one choice of one prompt of an API request)."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    text: str
    finish_reason: str
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # every sampled token, an end-of-response token included


class _Sequence:
    """A running sequence: its request, its text so far and its stream of uniforms."""

    def __init__(self, key: Hashable, request: GenerationRequest, tokenizer):
        self.key, self.request = key, request
        self.text = ResponseText(tokenizer, request.prompt_ids, request.max_new_tokens, request.stop)
        self.uniforms = episode_uniforms([request.seed], request.max_new_tokens)[0]  # (R,)

    def next_uniform(self) -> float:
        return float(self.uniforms[self.text.tokens])


class GenerationEngine:
    """Decodes `GenerationRequest`s with a causal LM, at most `max_rows` at once; owns the model and the
    tokenizer. Not thread-safe: one thread calls `step` at a time (`encode` may run beside it)."""

    def __init__(self, model, tokenizer, context_length: int | None = None, max_rows: int = 16):
        self.model = model
        self.tokenizer = tokenizer  # encodes prompts (the server's event loop)
        # steps decode text in a worker thread while the loop encodes new requests: a fast tokenizer is one
        # Rust object whose borrow checks can fail across threads ("RuntimeError: Already borrowed",
        # huggingface/tokenizers#537), so the decoding side has its own copy
        self.step_tokenizer = copy.deepcopy(tokenizer)
        self.context_length = context_length or model_context_length(model, tokenizer)
        self.prompts = PromptCodec(tokenizer, self.context_length)
        self.stop_token_ids = end_of_response_ids(tokenizer, getattr(model, "generation_config", None))
        self.max_rows = max_rows
        # a row's columns span at most one request (prompt + new tokens <= context); twice that leaves room
        # to drop the columns no row attends to any more only every so often
        self.batch = DecodeBatch(model, tokenizer.pad_token_id, capacity=64,
                                 max_capacity=2 * self.context_length)
        self.rows: list[_Sequence | None] = []  # model row -> its sequence; None: free (filler)
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of every row
        self._settings = None  # per-row sampling settings, rebuilt when the rows change

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.prompts.chat_prompt(messages)

    def check(self, request: GenerationRequest) -> None:
        """ValueError unless `request` can be decoded."""
        if not request.prompt_ids:
            raise ValueError("a prompt must have at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if len(request.prompt_ids) + request.max_new_tokens > self.context_length:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens "
                             f"exceed the context of {self.context_length}")

    @property
    def running(self) -> int:
        """Sequences being decoded."""
        return sum(row is not None for row in self.rows)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows if row is not None]

    def free_rows(self) -> int:
        """How many sequences the next step can take. A model whose cache cannot take rows mid-flight
        (`DecodeBatch.refillable`) takes new ones only when none is running."""
        running = self.running
        if running and not self.batch.refillable:
            return 0
        return self.max_rows - running

    def reset(self) -> None:
        """Forget every running sequence (after a failed step)."""
        self.rows, self.logits, self._settings = [], None, None

    @torch.inference_mode()
    def step(self, joining: Iterable[tuple[Hashable, GenerationRequest]] = (),
             leaving: Iterable[Hashable] = ()) -> list[tuple[Hashable, TextDelta]]:
        """One decoding step. `joining`: (key, request) of new sequences (at most `free_rows()`), checked with
        `check`; `leaving`: keys of sequences to drop without a word (their client left). Returns a delta for
        every running sequence, keyed as it joined; a finished one's last delta has its `finish_reason`."""
        self._leave(set(leaving))
        joining = list(joining)
        if joining:
            self._join(joining)
        if not self.running:
            self.reset()
            return []
        tokens = self._sample()  # (B,)
        deltas = self._advance(tokens.tolist())  # the one device-to-host copy of a step
        if not self.running:
            self.reset()
            return deltas
        tokens = self._drop_idle_rows(tokens)
        self.logits = self.batch.decode(tokens)  # (B, V)
        return deltas

    def _leave(self, keys: set) -> None:
        if not keys:
            return
        gone = [row for row, sequence in enumerate(self.rows) if sequence is not None and sequence.key in keys]
        self._retire(gone)

    def _retire(self, rows: list[int]) -> None:
        for row in rows:
            self.rows[row] = None
        if rows:
            self.batch.retire(np.asarray(rows))
            self._settings = None

    def _join(self, joining: list[tuple[Hashable, GenerationRequest]]) -> None:
        if len(joining) > self.free_rows():
            raise ValueError(f"{len(joining)} sequences joined but only {self.free_rows()} rows are free")
        sequences = [_Sequence(key, request, self.step_tokenizer) for key, request in joining]
        prompts = [list(sequence.request.prompt_ids) for sequence in sequences]
        self._settings = None
        if not self.running:  # a new batch
            need = max(map(len, prompts)) + max(s.request.max_new_tokens for s in sequences)
            self.logits = self.batch.prefill(prompts, capacity=min(2 * need, self.batch.max_capacity))
            self.rows = sequences
            return
        free = [row for row, sequence in enumerate(self.rows) if sequence is None][:len(sequences)]
        if len(free) < len(sequences):
            added = self.batch.add_rows(len(sequences) - len(free))
            self.logits = torch.cat([self.logits, self.logits.new_zeros((len(added), self.logits.shape[1]))])
            self.rows.extend([None] * len(added))
            free.extend(added.tolist())
        self.logits[torch.as_tensor(free, device=self.logits.device)] = self.batch.refill(np.asarray(free), prompts)
        for row, sequence in zip(free, sequences):
            self.rows[row] = sequence

    def _sample(self) -> torch.Tensor:
        """Every row's next token (B,); free rows draw filler."""
        temperature, top_p, greedy = self._row_settings()
        uniforms = None
        if greedy is not True:
            uniforms = torch.tensor([0.5 if s is None else s.next_uniform() for s in self.rows],
                                    dtype=torch.float32, device=self.logits.device)
        tokens, _ = sample_tokens(self.logits, uniforms, temperature, 0, top_p, greedy)
        return tokens

    def _row_settings(self):
        """Temperature, top-p and greedy for `sample_tokens`: a setting that every sampled row shares is one
        number (the rollout sampler's arithmetic exactly), others are per row; free rows are filler."""
        if self._settings is None:
            requests = [None if s is None else s.request for s in self.rows]
            sampled = [r for r in requests if r is not None and r.temperature > 0]
            if not sampled:  # every running row is greedy
                self._settings = (1.0, 1.0, True)
                return self._settings
            device = self.logits.device

            def one_or_per_row(field: str):
                values = {getattr(r, field) for r in sampled}
                if len(values) == 1:
                    return values.pop()
                rows = [getattr(r, field) if r is not None and r.temperature > 0 else 1.0 for r in requests]
                return torch.tensor(rows, dtype=torch.float32, device=device)[:, None]  # (B, 1)

            greedy = [r is not None and r.temperature == 0 for r in requests]
            self._settings = (one_or_per_row("temperature"), one_or_per_row("top_p"),
                              torch.tensor(greedy, device=device) if any(greedy) else False)
        return self._settings

    def _advance(self, tokens: list[int]) -> list[tuple[Hashable, TextDelta]]:
        """Each running sequence's text delta for its new token; finished ones free their rows."""
        deltas, finished = [], []
        for row, sequence in enumerate(self.rows):
            if sequence is None:
                continue
            delta = sequence.text.add(tokens[row], tokens[row] in self.stop_token_ids)
            deltas.append((sequence.key, delta))
            if delta.finish_reason is not None:
                finished.append(row)
        self._retire(finished)
        return deltas

    def _drop_idle_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Once half the rows are free, go on without them (they would cost a forward pass each step); the
        running rows' tokens."""
        free = [row for row, sequence in enumerate(self.rows) if sequence is None]
        if not free or len(free) * 2 < len(self.rows) or not self.batch.refillable:
            return tokens
        keep = np.asarray([row for row, sequence in enumerate(self.rows) if sequence is not None])
        self.batch.keep_rows(keep)
        index = torch.as_tensor(keep, device=tokens.device)
        self.rows = [self.rows[row] for row in keep]
        self._settings = None
        return tokens[index]

    # Requests run to the end in this thread

    def stream(self, requests: list[GenerationRequest]) -> Iterator[list[TextDelta | None]]:
        """One list per decoding step: a `TextDelta` for every request decoded in that step (its last one
        has `finish_reason` set), None for the others (not started yet, or finished)."""
        if self.running:
            raise RuntimeError("stream() needs an idle engine; a decode loop is running sequences on it")
        for request in requests:
            self.check(request)
        waiting = deque(enumerate(requests))
        unfinished = len(requests)
        while unfinished:
            joining = [waiting.popleft() for _ in range(min(self.free_rows(), len(waiting)))]
            deltas: list[TextDelta | None] = [None] * len(requests)
            for index, delta in self.step(joining):
                deltas[index] = delta
                unfinished -= delta.finish_reason is not None
            yield deltas

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """The finished text of every request (the stream, collected)."""
        texts, tokens = [""] * len(requests), [[] for _ in requests]
        results: list[Generation | None] = [None] * len(requests)
        for deltas in self.stream(requests):
            for index, delta in enumerate(deltas):
                if delta is None:
                    continue
                texts[index] += delta.text
                tokens[index].append(delta.token)
                if delta.finish_reason:
                    results[index] = Generation(texts[index], delta.finish_reason, delta.completion_tokens,
                                                tuple(tokens[index]))
        return results


def model_context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its position table, else the tokenizer's limit."""
    return config_context_length(model.config, tokenizer)
