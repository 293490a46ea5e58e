"""A new policy served without downtime, on a real Ray Serve: `deploy` of the same config with another
`PolicyUpdate` swaps the model replica's policy in place (`reconfigure`), while a client keeps sending
requests; none fails, the replica is not restarted, each response names the version that decoded it, and
a swap back serves the first policy's exact completions again."""

import threading
import time

import httpx
import pytest
import ray
from fastapi.testclient import TestClient
from ray import serve

from rlhf_ray.models import load_policy, save_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.app import APP_NAME
from rlhf_ray.serve.config import PolicyUpdate, ServeConfig
from rlhf_ray.serve.deploy import deploy
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_store import FeedbackStore
from test_serve_http import free_port

pytestmark = pytest.mark.timeout(420)

MODEL = "swapped"
REQUEST = {"model": MODEL, "prompt": "the movie was", "max_tokens": 8, "seed": 5}


def local_text(policy, tmp_path) -> str:
    """What `policy` answers REQUEST with, in this process (no Ray): the reference for the served text."""
    model, tokenizer = load_policy(str(policy))
    store = FeedbackStore(tmp_path / f"local-{policy.name}.db")
    try:
        backend = LocalBackend(GenerationEngine(model, tokenizer), store, MODEL, "local")
        with TestClient(build_api(backend, ServeConfig())) as client:
            return client.post("/v1/completions", json=REQUEST).json()["choices"][0]["text"]
    finally:
        store.close()


class Traffic:
    """Requests sent back to back from a thread, half of them streamed: status, version, start and end."""

    def __init__(self, base_url: str, model: str = MODEL):
        self.base_url, self.model, self.results, self.stop = base_url, model, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            for i in range(10_000):
                if self.stop.is_set():
                    return
                body = {"model": self.model, "prompt": f"request {i} was", "max_tokens": 16, "temperature": 1.0}
                began = time.monotonic()
                if i % 2:
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
                        version = httpx.Response(200, content=lines[-1][6:]).json()["system_fingerprint"] \
                            if response.status_code == 200 and lines else None
                        status = response.status_code
                else:
                    response = client.post("/v1/completions", json=body)
                    status = response.status_code
                    version = response.json().get("system_fingerprint") if status == 200 else None
                self.results.append((status, version, began, time.monotonic()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the client thread did not finish within 120 s"


def serving() -> dict:
    """The model replica's own account: its policy, version, process and replica id."""
    return serve.get_deployment_handle("PolicyServer", APP_NAME).serving.remote().result(timeout_s=60)


def test_swapping_the_policy_fails_no_request_and_restarts_no_replica(tmp_path):
    first, second = save_tiny_model(tmp_path / "first", seed=1), save_tiny_model(tmp_path / "second", seed=2)
    expected = {"v-first": local_text(first, tmp_path), "v-second": local_text(second, tmp_path)}
    assert expected["v-first"] != expected["v-second"]
    config = ServeConfig(policy=str(first), policy_version="v-first", model_name=MODEL,
                         feedback_db=str(tmp_path / "feedback.db"), num_cpus=1, max_tokens_limit=32)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(config)
        replica = serving()
        assert replica["policy_version"] == "v-first"
        swaps = []
        with httpx.Client(base_url=base_url, timeout=60) as client, Traffic(base_url) as traffic:
            for version, policy in (("v-second", second), ("v-first", first)):
                time.sleep(2.0)  # traffic on the serving version first
                began = time.monotonic()
                assert deploy(config, PolicyUpdate(policy=str(policy), policy_version=version))["policy_version"] \
                    == version
                swaps.append((began, time.monotonic()))
                assert client.get("/v1/models").json()["data"][0]["policy_version"] == version
                body = client.post("/v1/completions", json=REQUEST).json()
                assert (body["system_fingerprint"], body["choices"][0]["text"]) == (version, expected[version])
            time.sleep(2.0)
        now = serving()  # swapped in place: the same replica and process
        assert (now["replica"], now["pid"], now["policy"]) == (replica["replica"], replica["pid"], str(first))
    finally:
        serve.shutdown()
        ray.shutdown()

    results = traffic.results
    assert len(results) >= 10 and [status for status, *_ in results if status != 200] == []
    (first_began, first_ended), (second_began, second_ended) = swaps
    for began, _ in swaps:  # requests were in flight while each swap began
        assert any(start < began < end for _, _, start, end in results)

    def versions(after: float, before: float) -> set[str]:
        return {version for _, version, start, end in results if start > after and end < before}

    assert versions(0, first_began) == {"v-first"}
    assert versions(first_ended, second_began) == {"v-second"}
    assert versions(second_ended, float("inf")) == {"v-first"}
    print(f"{len(results)} requests, none failed; swaps took "
          + ", ".join(f"{end - start:.1f} s" for start, end in swaps))
