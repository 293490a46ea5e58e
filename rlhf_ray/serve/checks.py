"""The checks of a request that its schema cannot make (the model id, bounds that need the token counts),
and the one-line messages of the checks it can: every rejection names the request part and says what was
expected.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fastapi.exceptions import RequestValidationError

from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.schemas import ChatCompletionRequest

if TYPE_CHECKING:  # torch is imported where requests are sampled or tokenised only
    from rlhf_ray.serve.engine import GenerationRequest


class APIError(Exception):
    """A request the server will not serve: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def check_model(backend, model: str) -> None:
    if model != backend.model_name:
        raise APIError(404, f"model {model!r} not found; this server serves {backend.model_name!r}",
                       "model", "model_not_found")


def _check_bounds(config: ServeConfig, body, prompts: list[str], max_tokens: int) -> None:
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens_limit}",
                       "max_tokens")
    if len(prompts) * body.n > config.max_choices:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} asks for {len(prompts) * body.n} choices; "
                            f"this server allows at most {config.max_choices} per request", "n")
    stops = body.stop_strings
    if len(stops) > config.max_stop:
        raise APIError(400, f"{len(stops)} stop strings; at most {config.max_stop} allowed", "stop")
    if any(len(stop) > config.max_stop_chars for stop in stops):
        raise APIError(400, f"a stop string is longer than {config.max_stop_chars} characters", "stop")


def _check_context(config: ServeConfig, body, lengths: list[int], max_tokens: int, context: int) -> None:
    """Prompt tokens + max_tokens must fit the context; the message blames what the client can change:
    the prompt when it cannot fit at all (or max_tokens was the default), else the max_tokens it sent."""
    chat = isinstance(body, ChatCompletionRequest)
    param = "messages" if chat else "prompt"
    p = max(range(len(lengths)), key=lengths.__getitem__)
    which = "the messages take" if chat else "the prompt takes" if len(lengths) == 1 else f"prompt {p} takes"
    too_long = "the messages are too long" if chat else f"prompt {p} is too long"
    tokens = lengths[p]
    if config.max_prompt_tokens is not None and tokens > config.max_prompt_tokens:
        raise APIError(400, f"{too_long}: {tokens} tokens, but this server takes at most "
                            f"{config.max_prompt_tokens} (max_prompt_tokens)", param, "context_length_exceeded")
    if tokens >= context:
        raise APIError(400, f"{too_long}: {tokens} tokens, but the context is {context} tokens and the "
                            f"completion needs at least one: at most {context - 1} fit", param,
                       "context_length_exceeded")
    if tokens + max_tokens <= context:
        return
    if body.max_tokens is None:  # the default max_tokens: the prompt is what the client wrote
        raise APIError(400, f"{too_long}: {tokens} tokens, but at most {context - max_tokens} fit (context "
                            f"{context} tokens, max_tokens {max_tokens} by default; send a smaller max_tokens)",
                       param, "context_length_exceeded")
    sent = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    raise APIError(400, f"{sent} is {max_tokens} but the context is {context} tokens and {which} {tokens}: "
                        f"at most {context - tokens} fit", sent, "context_length_exceeded")


def generation_rows(backend, config: ServeConfig, body,
                    prompts: list[str]) -> tuple[list[GenerationRequest], list[int]]:
    """The sequences to sample for `prompts` x n choices, after every bound of the config is checked;
    also the prompts' token counts."""
    from rlhf_ray.sampling import episode_seed
    from rlhf_ray.serve.engine import GenerationRequest

    max_tokens = config.default_max_tokens if body.max_tokens is None else body.max_tokens
    _check_bounds(config, body, prompts, max_tokens)
    encoded = [tuple(backend.encode(prompt)) for prompt in prompts]
    for p, ids in enumerate(encoded):
        if not ids:
            raise APIError(400, f"prompt {p} is empty (no tokens)",
                           "messages" if isinstance(body, ChatCompletionRequest) else "prompt")
    _check_context(config, body, [len(ids) for ids in encoded], max_tokens, backend.context_length)
    seed = secrets.randbits(63) if body.seed is None else body.seed % (1 << 64)
    rows = [GenerationRequest(ids, max_tokens, body.temperature, body.top_p, episode_seed(seed, p, j),
                              body.stop_strings)
            for p, ids in enumerate(encoded) for j in range(body.n)]
    return rows, [len(ids) for ids in encoded]


# Messages of schema violations

_BRANCHES = ("str", "int", "float", "bool", "list")


def _is_branch(part: str) -> bool:
    """Whether a part of an error's location names a branch of a union (`str`, `list[str]`), not a field."""
    return part in _BRANCHES or "[" in part


def _drop_other_branches(items: list[dict]) -> list[dict]:
    """A union reports every branch; when one branch failed on the value's content (a surrogate in
    `messages.0.content.0.text`), the other branches' "Input should be a valid string" is noise."""
    def field(item):
        loc = [str(part) for part in item.get("loc", ())]
        cut = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
        return (tuple(loc[:cut]), item.get("type", "").endswith("_type")) if cut is not None else None

    keyed = [(item, field(item)) for item in items]
    specific = {key[0] for _, key in keyed if key is not None and not key[1]}
    return [item for item, key in keyed if key is None or not key[1] or key[0] not in specific]


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """One line per problem, naming the request part: `max_tokens: Input should be a valid integer`."""
    lines, first_param = [], None
    for item in _drop_other_branches(list(error.errors())):
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            reason = item.get("ctx", {}).get("error", "")
            return f"request body is not valid JSON{': ' + reason if reason else ''}", None
        if item.get("type") == "missing" and not loc:
            return "request body is missing (expected a JSON object)", None
        param = ".".join(part for part in loc if not _is_branch(part)) or None  # the field's path
        first_param = first_param or param
        message = item.get("msg", "invalid value").removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        if item.get("type") == "string_unicode" and param is None:  # a key, which pydantic reads before fields
            message = "a field name is not text (a lone surrogate); expected names that encode as UTF-8"
        # the value a field got; not the whole body a check of several fields got
        quiet = item.get("type") in ("missing", "extra_forbidden") or not loc
        got = "" if quiet else f" (got {item.get('input')!r:.80})"
        line = f"{param}: {message}{got}" if param else f"{message}{got}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines), first_param
