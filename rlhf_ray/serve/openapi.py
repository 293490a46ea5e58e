"""What /openapi.json says about the server: every status it answers (with OpenAI's error body), the
server-sent events of streamed responses, the API key, and the bounds of this deployment's `ServeConfig`
as far as JSON Schema can state them. FastAPI alone would list 200 and a 422 the server never sends (its
validation errors are 400s) and none of the bounds, which are configuration, not code.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.schemas import ChatCompletionChunk, ErrorResponse

REF = "#/components/schemas/{model}"
ERROR_REF = {"$ref": REF.format(model="ErrorResponse")}

# Statuses of the route handlers, on top of what the guard answers on every route (see _statuses).
BOUNDS = "max_tokens, choices, stop strings, prompt tokens + max_tokens beyond the context"
ROUTE_ERRORS = {
    ("post", "/v1/completions"): {400: f"the body is not JSON, or breaks the schema or a bound ({BOUNDS})",
                                  404: "model not found: this server serves one model"},
    ("post", "/v1/chat/completions"): {400: f"the body is not JSON, or breaks the schema or a bound ({BOUNDS}), "
                                            "or the chat template refuses the messages",
                                       404: "model not found: this server serves one model"},
    ("post", "/v1/feedback"): {400: "the body is not JSON, or breaks the schema, or choice_index is out of range",
                               404: "no completion with this id (or its stream has not ended yet)"},
    ("get", "/v1/models/{model}"): {404: "model not found: this server serves one model"},
}
STREAMED = {("post", "/v1/completions"): "Completion", ("post", "/v1/chat/completions"): "ChatCompletionChunk"}


def _event_schema(chunk: str) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1 has a stream's `schema` describe each event): `data` is
    a chunk, an error (a failure after the headers were sent) or the closing `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [{"$ref": REF.format(model=chunk)}, ERROR_REF]}}
    return {"type": "object", "required": ["data"],
            "description": f"with stream: true: server-sent events `data: <{chunk} JSON>`, the last `data: [DONE]`",
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _statuses(config: ServeConfig, method: str, path: str) -> dict[int, str]:
    """Every status but 200 that `method path` may answer, and why."""
    statuses = {
        400: "a malformed request (a Content-Length that is not a number)",
        408: f"the request body did not arrive within body_timeout_s ({config.body_timeout_s:g} s)",
        413: f"the request body is larger than max_request_bytes ({config.max_request_bytes} bytes)",
        500: "internal error (a server fault; the details are in the server log, never in the answer)",
    }
    if config.resolved_api_key() and path != "/health":
        statuses[401] = "missing or wrong API key (send 'Authorization: Bearer <key>')"
    statuses.update(ROUTE_ERRORS.get((method, path), {}))
    return dict(sorted(statuses.items()))


def _limit(prop: dict, **by_type: dict) -> None:
    """Add JSON Schema keywords to the branches of `prop` (anyOf of types) whose type is a key of `by_type`."""
    for branch in prop.get("anyOf", [prop]):
        branch.update(by_type.get(branch.get("type"), {}))


def _document_bounds(schemas: dict, config: ServeConfig, model_name: str, context_length: int) -> None:
    stop_text = {"minLength": 1, "maxLength": config.max_stop_chars}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["model"].update(examples=[model_name], description=f"this server serves {model_name!r} (404 for others)")
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                _limit(props[field], integer={"maximum": config.max_tokens_limit})
                props[field]["description"] = (f"default {config.default_max_tokens}; prompt tokens + max_tokens "
                                               f"must fit the context of {context_length} tokens")
        _limit(props["n"], integer={"maximum": config.max_choices})
        props["n"]["description"] = f"choices per prompt; prompts x n at most {config.max_choices}"
        _limit(props["stop"], string=stop_text,
               array={"maxItems": config.max_stop, "items": {"type": "string", **stop_text}})
    integer = {"type": "integer"}  # a field given as a number (null is as good as absent)
    schemas["ChatCompletionRequest"]["not"] = {  # one name of the token limit, not both
        "required": ["max_tokens", "max_completion_tokens"],
        "properties": {"max_tokens": integer, "max_completion_tokens": integer}}
    schemas["FeedbackRequest"]["anyOf"] = [  # a rating, a like, or a preferred choice
        *({"required": [name], "properties": {name: integer}} for name in ("rating", "choice_index")),
        {"required": ["like"], "properties": {"like": {"type": "boolean"}}}]
    schemas["FeedbackRequest"]["not"] = {"required": ["rating", "like"],  # not both
                                         "properties": {"rating": integer, "like": {"type": "boolean"}}}
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    _limit(prompt, string={"minLength": 1},  # "" has no tokens (400); so may others, such as " "
           array={"maxItems": config.max_choices, "items": {"type": "string", "minLength": 1}})
    prompt["description"] = "a prompt or a list of prompts; each must be non-empty and fit the context"


def _document(schema: dict, config: ServeConfig, model_name: str, context_length: int) -> dict:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which this server never sends
        schemas.pop(name, None)
    for model, mode in ((ErrorResponse, "validation"), (ChatCompletionChunk, "serialization")):
        model_schema = model.model_json_schema(ref_template=REF, mode=mode)
        schemas.update(model_schema.pop("$defs", {}), **{model.__name__: model_schema})
    _document_bounds(schemas, config, model_name, context_length)
    keyed = bool(config.resolved_api_key())
    if keyed:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "the server's API key"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status, why in _statuses(config, method, path).items():
                responses[str(status)] = {"description": why, "content": {"application/json": {"schema": ERROR_REF}}}
            if (method, path) in STREAMED:
                responses["200"]["content"]["text/event-stream"] = {"schema": _event_schema(STREAMED[method, path])}
            if "requestBody" in operation:
                operation["requestBody"]["description"] = (
                    f"JSON of at most {config.max_request_bytes} bytes (413 beyond), arriving within "
                    f"{config.body_timeout_s:g} s (408 beyond)")
            if keyed:
                operation["security"] = [] if path == "/health" else [{"bearer": []}]
    return schema


def document_api(app: FastAPI, config: ServeConfig, model_name: str, context_length: int) -> None:
    """Let `app` serve the schema of this deployment at /openapi.json (built once, on first request)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _document(schema, config, model_name, context_length)
        return app.openapi_schema

    app.openapi = openapi
