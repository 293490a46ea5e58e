"""Text as it is made: incremental detokenisation and stop strings, one piece per decoding step.

A piece is held back while it could still be part of a multi-byte character or the start of a stop
string, so streaming and stop strings cost no re-decoding of the whole response.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_TAIL_TOKENS = 6  # prompt tokens decoded before the first response token: keeps its leading space


class PolicyVersion(str):
    """The first item a model replica's `generate` yields for a job: the version of the policy decoding it
    (fixed for the job, even if the replica switches to a newer policy while the job runs)."""


@dataclass
class TextDelta:
    """What one step added to one sequence: its token, new text, and why it finished if it did."""

    text: str
    finish_reason: str | None = None  # "stop" (an end-of-response token or a stop string) | "length" (budget)
    completion_tokens: int = 0  # tokens sampled so far for the sequence
    token: int = -1  # the token sampled in this step


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


class ResponseText:
    """The text of one response as its tokens arrive: all of it so far, how much has been sent, and why it
    finished."""

    def __init__(self, tokenizer, prompt_ids: tuple[int, ...], max_new_tokens: int, stop: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.max_new_tokens, self.stop = max_new_tokens, stop
        self.text = ""
        self.sent = 0
        self.tokens = 0

    def add(self, token: int, ends_response: bool) -> TextDelta:
        """The delta of a new token; `ends_response`: it is an end-of-response token (not text)."""
        self.tokens += 1
        if ends_response:
            return self._advance(self.detokenizer.flush(), "stop", token)
        piece = self.detokenizer.push(token)
        if self.tokens >= self.max_new_tokens:
            return self._advance(piece + self.detokenizer.flush(), "length", token)
        return self._advance(piece, None, token)

    def _advance(self, piece: str, finish_reason: str | None, token: int) -> TextDelta:
        """Add `piece`; cut at a stop string; return the text that is now safe to send."""
        self.text += piece
        stops = self.stop
        if stops:
            cut = find_stop(self.text, stops, self.sent)
            if cut >= 0:
                self.text, finish_reason = self.text[:cut], "stop"
        held = stop_prefix_length(self.text[self.sent:], stops) if stops and finish_reason is None else 0
        delta = self.text[self.sent:len(self.text) - held]
        self.sent += len(delta)
        return TextDelta(delta, finish_reason, self.tokens, token)
