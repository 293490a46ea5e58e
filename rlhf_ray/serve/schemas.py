"""Request and response bodies of the HTTP API: OpenAI's shapes for completions, chat and models, plus
feedback. Requests are strict (no "5" for 5, no unknown fields: a typo is an error that names the field,
as OpenAI's own API answers); responses carry only what an OpenAI client reads.

References: https://platform.openai.com/docs/api-reference/completions,
https://platform.openai.com/docs/api-reference/chat (request fields, `data: [DONE]` streams).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


def _not_utf8(text: str) -> int | None:
    """Index of the first character of `text` that UTF-8 cannot encode (a lone surrogate), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _integer_field(annotation) -> bool:
    kinds = set(get_args(annotation)) or {annotation}
    return int in kinds and float not in kinds


def _unicode_text(value):
    """`value` if every string in it (a string, or a list's items) is text the tokenizer and the SQLite
    store can take: JSON escapes can spell lone surrogates (`"\\ud800"`), which no UTF-8 encoder accepts."""
    items = [(None, value)] if isinstance(value, str) else enumerate(value) if isinstance(value, list) else ()
    for index, item in items:
        at = _not_utf8(item) if isinstance(item, str) else None
        if at is not None:
            where = "" if index is None else f"item {index}: "
            raise PydanticCustomError(
                "text_not_unicode", "{where}character {at} is a lone surrogate ({code}), which is not text; "
                "expected text that encodes as UTF-8", {"where": where, "at": at, "code": f"U+{ord(item[at]):04X}"})
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_values(cls, value, info: ValidationInfo):
        """Checked before the type, so each field names itself (nested models check their own fields):
        text must be Unicode, and 2.0 is the integer 2 (JSON has one number type; JSON Schema agrees)."""
        integral = isinstance(value, float) and value.is_integer()
        if integral and _integer_field(cls.model_fields[info.field_name].annotation):
            return int(value)
        return _unicode_text(value)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)  # accepted and ignored, as a tag for the caller

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    @model_validator(mode="after")
    def _one_token_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class FeedbackRequest(_Request):
    """A rating of one choice (`rating`, 1..5), a like of it (`like`: thumbs up true, down false), or a
    preference (`choice_index` alone: that choice is preferred over the other choices of the same prompt)."""

    completion_id: str = Field(min_length=1, max_length=128)
    rating: int | None = Field(None, ge=1, le=5)
    like: bool | None = None
    choice_index: int | None = Field(None, ge=0)
    comment: str | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _rating_or_preference(self) -> "FeedbackRequest":
        if self.rating is not None and self.like is not None:
            raise ValueError("give a rating or a like, not both")
        if self.rating is None and self.like is None and self.choice_index is None:
            raise ValueError("give a rating (1..5), a like (true or false) or a choice_index (the preferred choice)")
        return self


class LabelRequest(_Request):
    """One annotator's judgement of one item of a queue: which answer is better and/or a rating of each."""

    queue: str = Field(min_length=1, max_length=64)
    item_id: int = Field(ge=0)
    choice: Literal["A", "B", "tie"] | None = None
    rating_a: int | None = Field(None, ge=1, le=5)
    rating_b: int | None = Field(None, ge=1, le=5)
    comment: str | None = Field(None, max_length=4096)


class PageChatRequest(_Request):
    """A turn of the chat page: the conversation so far; the server samples the policy's answer."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)


# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int
    logprobs: None = None


class _Generated(BaseModel):
    """What every completion, chat completion and stream chunk begins with."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None = None  # the policy version that wrote it


class CompletionChoice(_Choice):
    text: str
    finish_reason: str | None


class Completion(_Generated):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(_Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Generated):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-ray"
    policy_version: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackAck(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    completion_id: str
    kind: Literal["rating", "preference", "like"]
    created: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
