"""Hostile or careless client input, in process (FastAPI's TestClient over a `LocalBackend`, no Ray): text
that is not Unicode, max_tokens beyond the context, bodies that arrive slowly or never. Each is a 4xx that
names the request part and says what was expected, never a 500 or a hang. The same uploads against a real
Serve deployment, over sockets, are in tests/test_serve_http.py."""

import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_store import FeedbackStore
from rlhf_ray.serve.guard import GuardMiddleware

MODEL = "tiny"
HEADERS = {"content-type": "application/json"}
SURROGATE = "\\ud800"  # a JSON escape that spells a lone surrogate: not a character UTF-8 can encode


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)  # a context of 128 tokens
    store = FeedbackStore(tmp_path_factory.mktemp("input") / "feedback.db")
    yield LocalBackend(GenerationEngine(model, tokenizer), store, MODEL, "v1-test")
    store.close()


@pytest.fixture(scope="module")
def client(backend):
    # max_tokens may exceed the context here, so the context is the bound that answers
    with TestClient(build_api(backend, ServeConfig(max_tokens_limit=256)), raise_server_exceptions=False) as client:
        yield client


def post(client, path: str, body: str):
    response = client.post(path, content=body.encode(), headers=HEADERS)
    assert "Traceback" not in response.text
    return response.status_code, response.json()["error"] if response.status_code >= 400 else response.json()


NOT_UNICODE = [
    ("/v1/completions", f'{{"model": "tiny", "prompt": "the movie {SURROGATE}"}}', "prompt"),
    ("/v1/completions", f'{{"model": "tiny", "prompt": ["the movie", "{SURROGATE}"]}}', "prompt"),
    ("/v1/completions", f'{{"model": "tiny", "prompt": "the movie", "stop": ["x{SURROGATE}"]}}', "stop"),
    ("/v1/completions", f'{{"model": "tiny{SURROGATE}", "prompt": "the movie"}}', "model"),
    ("/v1/completions", f'{{"model": "tiny", "prompt": "the movie", "user": "{SURROGATE}"}}', "user"),
    ("/v1/chat/completions", f'{{"model": "tiny", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
     "messages.0.content"),
    ("/v1/chat/completions", f'{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}, {{"role": "user", '
                             f'"content": [{{"type": "text", "text": "a{SURROGATE}"}}]}}]}}',
     "messages.1.content.0.text"),
    ("/v1/chat/completions", f'{{"model": "tiny", "messages": [{{"role": "user", "content": "hi", '
                             f'"name": "{SURROGATE}"}}]}}', "messages.0.name"),
    ("/v1/feedback", f'{{"completion_id": "cmpl-1", "rating": 4, "comment": "fine {SURROGATE}"}}', "comment"),
    ("/v1/feedback", f'{{"completion_id": "cmpl-{SURROGATE}", "rating": 4}}', "completion_id"),
]


@pytest.mark.parametrize("path, body, param", NOT_UNICODE, ids=[f"{case[0]}:{case[2]}" for case in NOT_UNICODE])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(client, path, body, param):
    status, error = post(client, path, body)
    assert (status, error["param"]) == (400, param), error
    assert error["message"].startswith(f"{param}: ") and "lone surrogate (U+D800)" in error["message"]
    assert "expected text that encodes as UTF-8" in error["message"]


def test_a_field_name_that_is_not_unicode_is_a_400(client):
    status, error = post(client, "/v1/completions", f'{{"model": "tiny", "prompt": "a", "{SURROGATE}": 1}}')
    assert status == 400 and "field name is not text" in error["message"]


def test_real_unicode_text_is_served_and_stored(client, backend):
    status, body = post(client, "/v1/completions", '{"model": "tiny", "prompt": "caf\\u00e9 \\ud83d\\ude00", '
                                                   '"max_tokens": 2}')
    assert status == 200  # a surrogate *pair* is one character (U+1F600), which is fine
    assert backend.store.completion(body["id"])["choices"][0]["prompt"] == "café \U0001F600"


CONTEXT = [  # (request, param, message): the tiny model's context is 128 tokens
    ({"prompt": "the movie was good", "max_tokens": 200}, "max_tokens",
     "max_tokens is 200 but the context is 128 tokens and the prompt takes 4: at most 124 fit"),
    ({"prompt": ["the movie", "the movie was very good"], "max_tokens": 125}, "max_tokens",
     "max_tokens is 125 but the context is 128 tokens and prompt 1 takes 5: at most 123 fit"),
    ({"messages": [{"role": "user", "content": "the movie"}], "max_completion_tokens": 128}, "max_completion_tokens",
     "max_completion_tokens is 128 but the context is 128 tokens and the messages take"),
    ({"prompt": "the " * 130, "max_tokens": 1}, "prompt",
     "prompt 0 is too long: 130 tokens, but the context is 128 tokens and the completion needs at least one: "
     "at most 127 fit"),
    ({"prompt": "the " * 120}, "prompt",
     "prompt 0 is too long: 120 tokens, but at most 112 fit (context 128 tokens, max_tokens 16 by default"),
]


@pytest.mark.parametrize("request_fields, param, message", CONTEXT, ids=[case[1] for case in CONTEXT])
def test_what_does_not_fit_the_context_is_a_400_saying_what_fits(client, request_fields, param, message):
    path = "/v1/chat/completions" if "messages" in request_fields else "/v1/completions"
    status, error = post(client, path, json.dumps({"model": MODEL, **request_fields}))
    assert (status, error["param"], error["code"]) == (400, param, "context_length_exceeded")
    assert error["message"].startswith(message), error["message"]


def test_max_tokens_that_just_fits_is_served(client):
    status, body = post(client, "/v1/completions", '{"model": "tiny", "prompt": "the movie was good", '
                                                   '"max_tokens": 124, "temperature": 0}')
    assert status == 200 and body["usage"]["prompt_tokens"] == 4


def test_integral_numbers_are_integers_and_others_are_not(client):
    status, body = post(client, "/v1/completions", '{"model": "tiny", "prompt": "the", "max_tokens": 2.0, "n": 2.0}')
    assert status == 200 and len(body["choices"]) == 2  # JSON has one number type: 2.0 is 2
    status, error = post(client, "/v1/completions", '{"model": "tiny", "prompt": "the", "max_tokens": 2.5}')
    assert (status, error["param"]) == (400, "max_tokens")


# Bodies that arrive slowly or never: the guard answers 408 and the app never sees a partial request


def run_guard(messages, body_timeout_s: float = 0.3, interval_s: float = 0.0):
    """Send a POST through GuardMiddleware whose body is `messages`, one every `interval_s`, then nothing;
    returns (status, headers, body) of the answer and whether the app was called."""
    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope)

    async def receive():
        if not messages:
            await asyncio.sleep(3600)  # a client that went quiet; the guard's deadline cancels this
        await asyncio.sleep(interval_s)
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]}
    guard = GuardMiddleware(app, api_key=None, max_request_bytes=4096, body_timeout_s=body_timeout_s)
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 30))  # a hang fails here, not the whole run
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body), bool(called)


def test_a_body_that_stops_half_way_is_a_408_that_closes_the_connection():
    status, headers, body, called = run_guard([{"type": "http.request", "body": b'{"model": "', "more_body": True}])
    assert (status, called, headers[b"connection"]) == (408, False, b"close")
    assert body["error"]["code"] == "request_timeout"
    assert body["error"]["message"] == ("request body not received within 0.3 s (11 of 1000 bytes arrived); "
                                        "send the whole body at once")


def test_a_body_that_trickles_in_is_a_408_too():
    """One deadline for the whole body: a byte every 50 ms keeps no request open past body_timeout_s."""
    trickle = [{"type": "http.request", "body": b" ", "more_body": True} for _ in range(100)]
    status, _, body, called = run_guard(trickle, interval_s=0.05)
    assert (status, called) == (408, False) and "of 1000 bytes arrived" in body["error"]["message"]
