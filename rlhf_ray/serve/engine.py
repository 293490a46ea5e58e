"""Batched generation for the policy server: the requests of one Serve batch are sampled together.

The decoding loop follows the rollout sampler's (`rlhf_ray.rollout.sampler`): left-padded prompts, position
ids from the attention mask, one KV-cache forward per step with only the last position's logits, inverse-CDF
draws from a per-row stream of uniforms (the sampling math of `rlhf_ray.sampling`, shared with the sampler,
which loads no environment). What a server adds:

- every row has its own `max_new_tokens`, temperature (0: greedy) and top-p, and finishes on its own
  (EOS, a stop string, its token budget); the batch ends when every row has;
- text leaves as it is made: each step yields one `TextDelta` per row, detokenised incrementally (a piece
  is held back while it could still be part of a multi-byte character or the start of a stop string),
  so streaming and stop strings cost no re-decoding of the whole response;
- a row's randomness is `episode_uniforms([seed])`, a stream of its seed alone, so a request with a
  `seed` gets the same completion whichever requests share its batch.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from rlhf_ray.rollout.decoding import left_pad, position_ids_from_mask
from rlhf_ray.sampling import episode_uniforms, filter_top_k_top_p, inverse_cdf_sample
from rlhf_ray.serve.prompts import PromptCodec
from rlhf_ray.serve.prompts import context_length as config_context_length

PROMPT_TAIL_TOKENS = 6  # prompt tokens decoded before the first response token: keeps its leading space


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
class TextDelta:
    """What one step added to one row: new text, and why the row finished if it did."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" (token budget)
    completion_tokens: int = 0  # tokens sampled so far for the row


@dataclass
class Generation:
    text: str
    finish_reason: str
    completion_tokens: int


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index in `text` of the earliest stop string beginning at or after `start`; -1 if none."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits, default=-1)


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string: text to hold back."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class IncrementalDetokenizer:
    """Text of a growing token sequence, one piece per token (the offsets scheme of HF text-generation-
    inference and vLLM): decode a short window and emit what the newest token added, unless it ends in
    an incomplete UTF-8 character (U+FFFD), which waits for the next token."""

    def __init__(self, tokenizer, prompt_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_TAIL_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class _Row:
    """Text state of one row: all text so far, how much of it has been sent, and why it finished."""

    def __init__(self, request: GenerationRequest, tokenizer):
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.finish_reason: str | None = None

    def advance(self, piece: str, finish_reason: str | None) -> TextDelta:
        """Add `piece`; cut at a stop string; return the text that is now safe to send."""
        self.text += piece
        stops = self.request.stop
        if stops:
            cut = find_stop(self.text, stops, self.sent)
            if cut >= 0:
                self.text, finish_reason = self.text[:cut], "stop"
        held = stop_prefix_length(self.text[self.sent:], stops) if stops and finish_reason is None else 0
        delta = self.text[self.sent:len(self.text) - held]
        self.sent += len(delta)
        self.finish_reason = finish_reason
        return TextDelta(delta, finish_reason, self.tokens)


def _cache_argument(model) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether forward takes `logits_to_keep`); transformers 5 renamed
    `past_key_values` to `cache`."""
    params = inspect.signature(type(model).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class GenerationEngine:
    """Samples batches of `GenerationRequest`s with a causal LM; owns the model and the tokenizer."""

    def __init__(self, model, tokenizer, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer  # encodes prompts (the server's event loop)
        # `stream` decodes in a worker thread while the loop encodes new requests: a fast tokenizer is one
        # Rust object whose borrow checks can fail across threads ("RuntimeError: Already borrowed",
        # huggingface/tokenizers#537), so the decoding side has its own copy
        self.stream_tokenizer = copy.deepcopy(tokenizer)
        self.context_length = context_length or model_context_length(model, tokenizer)
        self.prompts = PromptCodec(tokenizer, self.context_length)
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self._cache_arg, self._logits_to_keep = _cache_argument(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.prompts.chat_prompt(messages)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """The finished text of every request (the stream, collected)."""
        texts = [""] * len(requests)
        results: list[Generation | None] = [None] * len(requests)
        for deltas in self.stream(requests):
            for row, delta in enumerate(deltas):
                if delta is None:
                    continue
                texts[row] += delta.text
                if delta.finish_reason:
                    results[row] = Generation(texts[row], delta.finish_reason, delta.completion_tokens)
        return results

    @torch.inference_mode()
    def stream(self, requests: list[GenerationRequest]) -> Iterator[list[TextDelta | None]]:
        """One list per decoding step: a `TextDelta` for every row still running in that step (its last
        one has `finish_reason` set), None for rows that finished before it."""
        if not requests:
            return
        for request in requests:
            if not request.prompt_ids:
                raise ValueError("a prompt must have at least one token")
            if len(request.prompt_ids) + request.max_new_tokens > self.context_length:
                raise ValueError(f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens "
                                 f"exceed the context of {self.context_length}")
        device, pad_id = self.device, self.tokenizer.pad_token_id
        batch = len(requests)
        steps = max(r.max_new_tokens for r in requests)
        rows = [_Row(r, self.stream_tokenizer) for r in requests]

        uniforms = torch.as_tensor(episode_uniforms([r.seed for r in requests], steps),
                                   dtype=torch.float32, device=device)  # (B, R)
        greedy = torch.tensor([r.temperature == 0 for r in requests], device=device)  # (B,)
        temperatures = torch.tensor([r.temperature or 1.0 for r in requests], device=device)[:, None]  # (B, 1)
        scale = bool((temperatures != 1.0).any())
        top_p_rows = {}  # top-p value -> rows that use it (nucleus filtering takes one value at a time)
        for row, request in enumerate(requests):
            if request.top_p < 1.0 and request.temperature > 0:
                top_p_rows.setdefault(request.top_p, []).append(row)
        budgets = np.array([r.max_new_tokens for r in requests])  # (B,)
        stop_ids = torch.tensor(sorted(self.stop_token_ids), dtype=torch.long, device=device)

        input_ids, prompt_mask = left_pad([list(r.prompt_ids) for r in requests], pad_id)  # (B, P)
        prompt_width = input_ids.shape[1]
        input_ids = input_ids.to(device)
        # the mask of the whole batch, allocated once; step t sees its first P + t columns
        attention_mask = torch.ones((batch, prompt_width + steps), dtype=torch.long, device=device)  # (B, P + R)
        attention_mask[:, :prompt_width] = prompt_mask
        position_ids = position_ids_from_mask(attention_mask[:, :prompt_width])  # (B, P)
        forward_kwargs = {"use_cache": True, self._cache_arg: None}
        if self._logits_to_keep:
            forward_kwargs["logits_to_keep"] = 1
        done = np.zeros(batch, dtype=bool)

        for step in range(steps):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask[:, :prompt_width + step],
                             position_ids=position_ids, **forward_kwargs)
            forward_kwargs[self._cache_arg] = (out[self._cache_arg] if self._cache_arg in out
                                               else out.past_key_values)
            logits = out.logits[:, -1, :].float()  # (B, V)
            probs = torch.softmax(logits / temperatures if scale else logits, dim=-1)  # (B, V)
            for top_p, members in top_p_rows.items():
                probs[members] = filter_top_k_top_p(probs[members], 0, top_p)
            tokens = inverse_cdf_sample(probs, uniforms[:, step])  # (B,)
            tokens = torch.where(greedy, torch.argmax(logits, dim=-1), tokens)
            ended = torch.isin(tokens, stop_ids).cpu().numpy()  # (B,)
            token_list = tokens.tolist()  # the one device-to-host copy of a step

            deltas: list[TextDelta | None] = [None] * batch
            for row in np.flatnonzero(~done):
                state = rows[row]
                state.tokens += 1
                if ended[row]:  # EOS ends the row; the token itself is not text
                    deltas[row] = state.advance(state.detokenizer.flush(), "stop")
                    continue
                piece = state.detokenizer.push(token_list[row])
                if state.tokens >= budgets[row]:
                    deltas[row] = state.advance(piece + state.detokenizer.flush(), "length")
                else:
                    deltas[row] = state.advance(piece, None)
                done[row] = state.finish_reason is not None
            done |= ended
            yield deltas
            if done.all():
                return
            input_ids = tokens.masked_fill(torch.from_numpy(done).to(device), pad_id)[:, None]  # (B, 1)
            position_ids = position_ids[:, -1:] + 1  # (B, 1)


def model_context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its position table, else the tokenizer's limit."""
    return config_context_length(model.config, tokenizer)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation EOS ids (chat models
    often end a turn with a token of their own, such as <|im_end|>)."""
    ids = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, generation_eos):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model no generation eos_token_id")
    return ids
