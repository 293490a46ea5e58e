"""The HTTP API of the policy server as a plain FastAPI app over a `Backend`, so it runs (and is tested)
with or without Ray Serve; in production its backend is the ingress deployment of `rlhf_ray.serve.app`,
which hands the sampling to the model replicas.

    GET  /health                 liveness, no key needed
    GET  /v1/models              the served policy
    POST /v1/completions         OpenAI completions (n, temperature, top_p, max_tokens, stop, seed, stream)
    POST /v1/chat/completions    OpenAI chat completions (the same parameters)
    POST /v1/feedback            a rating (1..5) of a choice, or the preferred choice of a response

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx status that says what
was wrong with which request part; an unexpected failure is a 500 that says only "internal error" (the
traceback goes to the server log, never to the client). Streams are server-sent events ending in
`data: [DONE]`; a failure inside a stream is one `data: {"error": ...}` event. /openapi.json lists every
status and bound (serve/openapi.py); request checks are in serve/checks.py.

A response is sent (a stream ends) only after its completion is stored, so every id a client receives
can be rated at once; feedback on a stream that has not ended yet is a 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_ray.serve.checks import APIError, check_model, generation_rows, validation_message
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.decode_loop import DecodeLoop, GenerationJob
from rlhf_ray.serve.feedback_store import STORE_OPS, ChoiceRecord, CompletionRecord, FeedbackError
from rlhf_ray.serve.guard import GuardMiddleware, error_response
from rlhf_ray.serve.openapi import document_api
from rlhf_ray.serve.pages import add_page_routes
from rlhf_ray.serve.schemas import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, Completion, CompletionChoice, CompletionRequest, FeedbackAck, FeedbackRequest, Health, ModelCard,
    ModelList, Usage,
)
from rlhf_ray.serve.text import PolicyVersion

if TYPE_CHECKING:  # torch is imported by the model replica only (not by the feedback store's)
    from rlhf_ray.serve.engine import TextDelta

logger = logging.getLogger("rlhf_ray.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend(Protocol):
    model_name: str
    policy_version: str
    created: int
    context_length: int

    def encode(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...

    def generate(self, job: GenerationJob) -> AsyncIterator[PolicyVersion | list[tuple[int, TextDelta]]]:
        """First the version of the policy that decodes the job, then (choice index, delta) lists as they
        are made; every choice's last delta has a finish_reason."""

    async def record(self, record: CompletionRecord) -> None: ...

    async def call_store(self, op: str, **kwargs):
        """`FeedbackStore.<op>(**kwargs)` (an op of `STORE_OPS`) in the store's process; FeedbackError."""


class LocalBackend:
    """A backend in this process: an engine and a feedback store, no Ray (tests, single-process use)."""

    def __init__(self, engine, store, model_name: str, policy_version: str):
        self.engine, self.store = engine, store
        self.model_name, self.policy_version = model_name, policy_version
        self.created = int(time.time())
        self.context_length = engine.context_length
        self.decode_loop = DecodeLoop(engine)

    def encode(self, text):
        return self.engine.encode(text)

    def chat_prompt(self, messages):
        return self.engine.chat_prompt(messages)

    async def generate(self, job):
        yield PolicyVersion(self.policy_version)
        async for outputs in self.decode_loop.generate(job):
            yield outputs

    async def record(self, record):
        self.store.record_completions([record])

    async def call_store(self, op, **kwargs):
        if op not in STORE_OPS:
            raise ValueError(f"{op!r} is not a feedback store operation of {STORE_OPS}")
        return getattr(self.store, op)(**kwargs)


def _sampling_record(body) -> dict:
    return body.model_dump(mode="json", exclude={"model", "prompt", "messages", "stream", "stream_options"},
                           exclude_none=True)


def _sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


_INTERNAL = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}


class _Completions:
    """The work common to /v1/completions and /v1/chat/completions."""

    def __init__(self, backend: Backend, endpoint: str, body, prompts: list[str], rows, prompt_tokens: list[int]):
        self.backend, self.endpoint, self.body, self.prompts = backend, endpoint, body, prompts
        self.rows, self.prompt_tokens = rows, prompt_tokens
        self.id = ("chatcmpl-" if endpoint == "chat.completions" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.texts = [""] * len(rows)
        self.finish_reasons: list[str | None] = [None] * len(rows)
        self.completion_tokens = [0] * len(rows)
        self.policy_version = backend.policy_version  # until the model replica says which version decodes it

    def take(self, choice: int, delta: TextDelta) -> str:
        """Add a delta; returns the text to show (chat answers start at their first non-space)."""
        text = delta.text
        if self.endpoint == "chat.completions" and not self.texts[choice]:
            text = text.lstrip()
        self.texts[choice] += text
        self.completion_tokens[choice] = delta.completion_tokens
        if delta.finish_reason:
            self.finish_reasons[choice] = delta.finish_reason
        return text

    def usage(self) -> Usage:
        prompt, completion = sum(self.prompt_tokens), sum(self.completion_tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def record(self) -> None:
        n = self.body.n
        choices = [ChoiceRecord(i, i // n, self.prompts[i // n], self.texts[i], self.finish_reasons[i] or "length")
                   for i in range(len(self.rows))]
        request = _sampling_record(self.body)
        if self.endpoint == "chat.completions":
            request["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in self.body.messages]
        await self.backend.record(CompletionRecord(self.id, time.time(), self.backend.model_name,
                                                   self.policy_version, self.endpoint, choices, request))

    async def run(self) -> None:
        async for deltas in self.backend.generate(GenerationJob(self.rows, stream=False)):
            if isinstance(deltas, PolicyVersion):
                self.policy_version = str(deltas)
                continue
            for choice, delta in deltas:
                self.take(choice, delta)
        await self.record()

    def header(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.backend.model_name,
                "system_fingerprint": self.policy_version}

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streamed response."""
        chat = self.endpoint == "chat.completions"
        try:
            async for deltas in self.backend.generate(GenerationJob(self.rows, stream=True)):
                if isinstance(deltas, PolicyVersion):  # first: every chunk then names the version
                    self.policy_version = str(deltas)
                    if chat:  # OpenAI opens each choice with the role
                        yield _sse(ChatCompletionChunk(**self.header(), choices=[
                            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                            for i in range(len(self.rows))]).model_dump(mode="json"))
                    continue
                for choice, delta in deltas:
                    text = self.take(choice, delta)
                    if not text and not delta.finish_reason:
                        continue
                    if chat:
                        chunk = ChatCompletionChunk(**self.header(), choices=[ChatChunkChoice(
                            index=choice, delta=ChatDelta(content=text or None), finish_reason=delta.finish_reason)])
                    else:
                        chunk = Completion(**self.header(), choices=[CompletionChoice(
                            index=choice, text=text, finish_reason=delta.finish_reason)])
                    yield _sse(chunk.model_dump(mode="json", exclude_none=chat))
            await self.record()
            options = self.body.stream_options
            if options is not None and options.include_usage:
                usage_chunk = (ChatCompletionChunk(**self.header(), choices=[], usage=self.usage()) if chat
                               else Completion(**self.header(), choices=[], usage=self.usage()))
                yield _sse(usage_chunk.model_dump(mode="json"))
            yield _sse("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception:  # headers are sent: the failure can only be an event
            logger.exception("stream %s failed", self.id)
            yield _sse(_INTERNAL)


# The app


def build_api(backend: Backend, config: ServeConfig) -> FastAPI:
    """The FastAPI app of the server, over `backend`, with the bounds and key of `config`."""
    app = FastAPI(title="rlhf-ray policy server", version="1", docs_url="/docs", redoc_url=None)
    app.add_middleware(GuardMiddleware, api_key=config.resolved_api_key(), max_request_bytes=config.max_request_bytes,
                       body_timeout_s=config.body_timeout_s)
    document_api(app, config, backend.model_name, backend.context_length)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, err: FeedbackError):
        code = "completion_not_found" if err.status == 404 and err.param == "completion_id" else None
        return error_response(err.status, err.message, param=err.param, code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        message, param = validation_message(err)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                                                              f"{request.url.path}",
                    400: "request body cannot be read as JSON (expected a JSON object in UTF-8)"}
        return error_response(err.status_code, messages.get(err.status_code, str(err.detail)),
                              headers=getattr(err, "headers", None))

    @app.get("/health")
    async def health() -> Health:
        return Health()

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=backend.model_name, created=backend.created,
                                         policy_version=backend.policy_version)])

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> ModelCard:
        check_model(backend, model)
        return ModelCard(id=backend.model_name, created=backend.created, policy_version=backend.policy_version)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest):
        check_model(backend, body.model)
        rows, prompt_tokens = generation_rows(backend, config, body, body.prompts)
        job = _Completions(backend, "completions", body, body.prompts, rows, prompt_tokens)
        if body.stream:
            return StreamingResponse(job.events(), media_type="text/event-stream", headers=SSE_HEADERS)
        await job.run()
        return Completion(**job.header(), usage=job.usage(), choices=[
            CompletionChoice(index=i, text=text, finish_reason=reason)
            for i, (text, reason) in enumerate(zip(job.texts, job.finish_reasons))])

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest):
        check_model(backend, body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            prompt = backend.chat_prompt(messages)
        except Exception as err:  # a chat template that refuses these messages (e.g. roles out of order)
            raise APIError(400, f"messages cannot be rendered by the model's chat template: {err}",
                           "messages") from None
        rows, prompt_tokens = generation_rows(backend, config, body, [prompt])
        job = _Completions(backend, "chat.completions", body, [prompt], rows, prompt_tokens)
        if body.stream:
            return StreamingResponse(job.events(), media_type="text/event-stream", headers=SSE_HEADERS)
        await job.run()
        return ChatCompletion(**job.header(), usage=job.usage(), choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
            for i, (text, reason) in enumerate(zip(job.texts, job.finish_reasons))])

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> FeedbackAck:
        return FeedbackAck(**await backend.call_store("add_feedback", **body.model_dump()))

    add_page_routes(app, backend, chat_completions)

    return app
