"""The HTTP API in-process (FastAPI's TestClient over a `LocalBackend`), the server's configuration and
CLI arguments, and the Serve config file and RayService manifest. No Ray cluster: the real Serve
deployment is tested in tests/test_serve_http.py."""

from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.config import ServeConfig, parse_replicas
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_store import FeedbackStore

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)
    return GenerationEngine(model, tokenizer)


@pytest.fixture
def backend(engine, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    yield LocalBackend(engine, store, MODEL, "v1-test")
    store.close()


@pytest.fixture
def client(backend):
    config = ServeConfig(api_key=KEY, max_tokens_limit=32, max_request_bytes=4096, max_prompt_tokens=64)
    with TestClient(build_api(backend, config), raise_server_exceptions=False) as client:
        yield client


def test_completion_has_an_id_choices_and_usage(client):
    response = client.post("/v1/completions", headers=AUTH,
                           json={"model": MODEL, "prompt": ["the movie was", "i think"], "n": 2, "max_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 5  # each prompt once, not once per choice
    assert body["system_fingerprint"] == "v1-test"


def test_a_seeded_request_is_the_rollout_episode_of_that_run_seed(client, engine):
    """`seed` s for prompt p, choice j is the rollout sampler's episode seed (s, p, j): the same completion
    for the same model and settings as the rollout at iteration p, prompt j of a run seeded s."""
    from rlhf_ray.rollout.sampler import Sampler, SamplingParams
    from rlhf_ray.sampling import episode_seed

    body = client.post("/v1/completions", headers=AUTH, json={
        "model": MODEL, "prompt": "i think the food", "n": 2, "max_tokens": 10, "seed": 77, "temperature": 0.9,
    }).json()
    prompt_ids = engine.encode("i think the food")
    sampler = Sampler(engine.model, engine.tokenizer, lambda p, r: [0.0] * len(p),
                      SamplingParams(max_new_tokens=10, temperature=0.9))
    episodes = sampler.generate([prompt_ids, prompt_ids], [episode_seed(77, 0, 0), episode_seed(77, 0, 1)])
    assert [c["text"].strip() for c in body["choices"]] == [e.response.strip() for e in episodes]
    assert len({c["text"] for c in body["choices"]}) == 2


def test_completion_is_recorded_before_the_response(client, backend):
    body = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "the movie was"}).json()
    stored = backend.store.completion(body["id"])
    assert stored["choices"][0]["response"] == body["choices"][0]["text"]
    assert stored["choices"][0]["prompt"] == "the movie was" and stored["policy_version"] == "v1-test"


def test_chat_stream_opens_with_the_role_and_ends_with_done(client):
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "the movie"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)


BAD_REQUESTS = [
    ("not JSON", "/v1/completions", b"{", 400, "not valid JSON"),
    ("a list, not an object", "/v1/completions", b"[1]", 400, "valid dictionary"),
    ("no prompt", "/v1/completions", {"model": MODEL}, 400, "prompt: Field required"),
    ("a string for an integer", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400,
     "max_tokens"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "not found"),
    ("unsupported field", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("max_tokens over the limit", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 33}, 400,
     "at most 32"),
    ("too many choices", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 9}, 400, "choices"),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": "the " * 70}, 400, "too long"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("temperature out of range", "/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 3}, 400,
     "temperature"),
    ("chat without messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat with an unknown role", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("rating out of range", "/v1/feedback", {"completion_id": "x", "rating": 6}, 400, "rating"),
    ("feedback without rating or choice", "/v1/feedback", {"completion_id": "x"}, 400, "rating"),
    ("feedback on an unknown completion", "/v1/feedback", {"completion_id": "x", "rating": 3}, 404, "no completion"),
    ("a body over the size limit", "/v1/completions", {"model": MODEL, "prompt": "a" * 5000}, 413, "larger than"),
]


@pytest.mark.parametrize("path, body, status, reason", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_answered_4xx_with_a_reason(client, path, body, status, reason):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(path, headers={**AUTH, "content-type": "application/json"}, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert reason in error["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"),
                                          ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nowhere")])
def test_every_route_but_health_answers_401_without_the_key(client, method, path, headers):
    response = client.request(method, path, headers=headers, json={"model": MODEL, "prompt": "a"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_health_needs_no_key(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_an_internal_failure_is_a_500_without_a_traceback(client, backend, monkeypatch):
    async def broken(job):
        raise RuntimeError("secret internals at /srv/model.py line 12")
        yield

    monkeypatch.setattr(backend, "generate", broken)
    response = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "the movie"})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error", "type": "server_error", "param": None,
                                         "code": None}
    assert "secret" not in response.text and "Traceback" not in response.text


def test_a_failure_inside_a_stream_is_an_error_event_without_details(client, backend, monkeypatch):
    async def broken(job):
        raise RuntimeError("secret internals")
        yield

    monkeypatch.setattr(backend, "generate", broken)
    with client.stream("POST", "/v1/completions", headers=AUTH,
                       json={"model": MODEL, "prompt": "the movie", "stream": True}) as response:
        text = response.read().decode()
    assert '"message":"internal error"' in text and "secret" not in text


def test_feedback_is_acknowledged_with_its_id(client):
    completion = client.post("/v1/completions", headers=AUTH,
                             json={"model": MODEL, "prompt": "the movie was", "n": 3, "max_tokens": 4}).json()
    ack = client.post("/v1/feedback", headers=AUTH, json={"completion_id": completion["id"], "choice_index": 2})
    assert ack.status_code == 200
    assert ack.json()["kind"] == "preference" and ack.json()["completion_id"] == completion["id"]


# Configuration, CLI arguments, config files


def test_replicas_argument():
    assert parse_replicas("2") == (2, 2) and parse_replicas("1:4") == (1, 4)
    for bad in ("4:1", "a", "1:", "-1:2"):
        with pytest.raises(ValueError):
            parse_replicas(bad)


def test_serve_config_rejects_unknown_fields_and_inconsistent_bounds():
    with pytest.raises(ValueError, match="max_tokens_limt"):
        ServeConfig(max_tokens_limt=3)
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="ingress_max_ongoing_requests"):
        ServeConfig(ingress_max_ongoing_requests=10)  # fewer open requests than one model replica takes


def test_api_key_comes_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv("RLHF_RAY_API_KEY", "from-env")
    assert ServeConfig().resolved_api_key() == "from-env"
    assert ServeConfig(api_key="given").resolved_api_key() == "given"


def test_serve_command_with_a_missing_policy_fails_before_starting_ray(tmp_path, capsys):
    from rlhf_ray.cli import main

    assert main(["serve", str(tmp_path / "no-such-policy")]) == 2
    assert "not found" in capsys.readouterr().err


def test_build_app_puts_a_light_ingress_before_the_autoscaled_model_and_the_store(tmp_path):
    from rlhf_ray.serve.app import build_app

    config = ServeConfig(min_replicas=1, max_replicas=3, max_batch_size=8, feedback_db=str(tmp_path / "f.db"))
    ingress = build_app(config)._bound_deployment
    # the ingress reserves no CPU and holds many open requests (slow uploads wait there, not at the model)
    assert ingress.ray_actor_options["num_cpus"] == 0
    assert ingress.max_ongoing_requests == config.ingress_max_ongoing_requests > config.max_ongoing_requests
    model, store = (arg._bound_deployment for arg in ingress.init_args[1:])
    autoscaling = model._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert model.max_ongoing_requests == config.max_ongoing_requests
    assert ingress.init_args[0]["max_batch_size"] == model.init_args[0]["max_batch_size"] == 8
    assert store.num_replicas == 1 and store.init_args == (str(tmp_path / "f.db"),)


def serve_apps() -> list[tuple[str, dict]]:
    rayservice = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    service = next(d for d in rayservice if d["kind"] == "RayService")
    return [("cluster/serve_config.yaml", yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())),
            ("cluster/rayservice.yaml", yaml.safe_load(service["spec"]["serveConfigV2"]))]


@pytest.mark.parametrize("name, serve_config", serve_apps(), ids=lambda x: x if isinstance(x, str) else "")
def test_serve_config_is_accepted_by_serve_and_builds_the_app(name, serve_config):
    """What `serve run` / `serve deploy` do before deploying: validate the schema, import the builder and
    call it with `args` validated against its annotation."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema
    from ray._common.utils import import_attr

    schema = ServeDeploySchema.model_validate(serve_config)
    for application in schema.applications:
        builder = import_attr(application.import_path)
        app = call_user_app_builder_with_args_if_necessary(builder, application.args)
        config = ServeConfig.model_validate(app._bound_deployment.init_args[0])
        assert config.model_dump(include=set(application.args)) == ServeConfig.model_validate(application.args) \
            .model_dump(include=set(application.args))


def test_rayservice_places_the_feedback_store_on_the_head_with_its_disk():
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    service = next(d for d in docs if d["kind"] == "RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert set(args["store_resources"]) <= set(yaml.safe_load(yaml.safe_load(head["rayStartParams"]["resources"])))
    mounts = {m["mountPath"]: m["name"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert Path(args["feedback_db"]).parent.as_posix() in mounts
    claim = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == mounts["/var/lib/rlhf-ray"])
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for group in [head] + service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        env = group["template"]["spec"]["containers"][0]["env"]
        assert any(e["name"] == "RLHF_RAY_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in env)


def test_model_name_and_policy_version_of_a_run_folder(tmp_path):
    import json

    from rlhf_ray.models import save_tiny_model
    from rlhf_ray.serve.policy import model_name, policy_version

    policy = save_tiny_model(tmp_path / "runs" / "quickstart" / "policy")
    assert model_name(str(policy)) == "quickstart"
    digest = policy_version(str(policy))
    (policy.parent / "metrics.jsonl").write_text(json.dumps({"iteration": 40, "policy_version": 40}) + "\n")
    assert policy_version(str(policy)) == f"v40-{digest}"
    checkpoint = save_tiny_model(tmp_path / "runs" / "quickstart" / "checkpoints" / "iter_000020" / "policy", seed=1)
    (checkpoint.parent / "run_state.json").write_text(json.dumps({"iteration": 20, "policy_version": 20}))
    assert model_name(str(checkpoint)) == "quickstart@iter_000020"
    assert policy_version(str(checkpoint)).startswith("v20-") and not policy_version(str(checkpoint)).endswith(digest)
    assert model_name("rlhf-ray/tiny-gpt2") == "rlhf-ray/tiny-gpt2"
