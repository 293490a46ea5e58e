"""/openapi.json says what the server does, checked by property-based tests with Schemathesis: requests
generated from the schema (valid ones, and ones that break it) never get a 5xx, nor a status, content type
or body the schema does not document for that operation. In process (FastAPI's app over a `LocalBackend`
with a tiny model), so it is cheap; the number of examples is capped."""

import hypothesis
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance, negative_data_rejection, not_a_server_error, response_schema_conformance,
    status_code_conformance,
)

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_store import FeedbackStore

pytestmark = pytest.mark.timeout(300)

KEY = "schema-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
CONFIG = ServeConfig(api_key=KEY, max_tokens_limit=8, default_max_tokens=4, max_choices=4, max_request_bytes=4096,
                     max_stop=2, max_stop_chars=8)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)
    store = FeedbackStore(tmp_path_factory.mktemp("openapi") / "feedback.db")
    yield build_api(LocalBackend(GenerationEngine(model, tokenizer), store, MODEL, "v1-test"), CONFIG)
    store.close()


@pytest.fixture(scope="module")
def completion_id(app) -> str:
    """A stored completion with 2 choices, for feedback cases to rate."""
    with TestClient(app) as client:
        body = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "the day", "n": 2,
                                                                   "max_tokens": 2})
    assert body.status_code == 200, body.text
    return body.json()["id"]


@pytest.fixture(scope="module")
def api_schema(app, completion_id):
    # what breaks the schema may be refused with any documented 4xx: 413 for a body over max_request_bytes
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "404", "413"]}}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=AUTH)

    @schema.hook
    def flatmap_case(context, case):
        """Half the valid requests name the served model (and the stored completion), so generation,
        streaming and feedback run too, not only their 404s."""
        if not case.meta or not case.meta.generation.mode.is_positive:
            return st.just(case)
        known = {"model": MODEL, "completion_id": completion_id}
        body = case.body if isinstance(case.body, dict) else {}
        path = case.path_parameters or {}
        if not set(known) & (set(body) | set(path)):
            return st.just(case)
        return st.booleans().map(lambda use: _with_known(case, known) if use else case)

    return schema


def _with_known(case, known: dict):
    if isinstance(case.body, dict):
        case.body = {**case.body, **{key: value for key, value in known.items() if key in case.body}}
    if case.path_parameters:
        case.path_parameters = {**case.path_parameters, **{k: v for k, v in known.items() if k in case.path_parameters}}
    return case


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_answer_is_documented_and_none_is_a_server_error(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS)


def test_schema_documents_errors_streams_the_key_and_the_bounds(app):
    with TestClient(app) as client:
        document = client.get("/openapi.json", headers=AUTH).json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    completions = paths["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "408", "413", "500"}
    assert all(response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
               for status, response in completions["responses"].items() if status != "200")
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert not any("422" in operation["responses"] for path in paths.values() for operation in path.values())
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                                    "description": "the server's API key"}
    assert completions["security"] == [{"bearer": []}] and paths["/health"]["get"]["security"] == []
    assert "401" not in paths["/health"]["get"]["responses"]
    request = schemas["CompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 8} in request["max_tokens"]["anyOf"]
    assert request["n"]["maximum"] == 4
    stop_list = next(branch for branch in request["stop"]["anyOf"] if branch.get("type") == "array")
    assert stop_list["maxItems"] == 2 and stop_list["items"]["maxLength"] == 8
    assert "4096 bytes" in completions["requestBody"]["description"]
