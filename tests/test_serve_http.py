"""The policy server on a real Ray Serve (127.0.0.1, a free port, a tiny policy): HTTP calls with httpx and
with the official openai client, streaming, 32 concurrent requests, bad requests, the API key, uploads that
stall half-way, feedback that survives a restart of the server, and its export as the reward model's
dataset."""

import asyncio
import json
import resource
import selectors
import socket
import time

import httpx
import numpy as np
import openai
import pytest
import ray
from ray import serve

from rlhf_ray.cli import main
from rlhf_ray.serve.app import APP_NAME, build_app
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.feedback_store import FeedbackStore

pytestmark = pytest.mark.timeout(420)

KEY = "serve-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-policy"
TIMEOUT = httpx.Timeout(60.0)
BODY_TIMEOUT_S = 4.0  # short, so the stalled-upload test waits little; every other request sends its body at once


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, config: ServeConfig):
        self.config, self.port = config, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(build_app(self.config), name=APP_NAME, route_prefix="/")

    def restart(self) -> None:
        """Shut Serve down (proxy, controller, every replica) and start it again on the same database."""
        serve.shutdown()
        self.start()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=TIMEOUT, **{"headers": AUTH, **kwargs})


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    config = ServeConfig(
        policy=str(tiny_model_dir), model_name=MODEL, api_key=KEY,
        feedback_db=str(tmp_path_factory.mktemp("serve") / "feedback.db"),
        min_replicas=1, max_replicas=2, target_ongoing_requests=64,  # autoscaled, but this load stays on one
        num_cpus=1, max_batch_size=16, max_tokens_limit=32, body_timeout_s=BODY_TIMEOUT_S,
    )
    # the stalled-upload test holds hundreds of sockets in this process and in the proxy (Ray's children
    # inherit the limit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        server = Server(config)
        server.start()
        yield server
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "the movie was", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_the_policy_and_health_needs_no_key(server):
    with server.client(headers={}) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
    with server.client() as client:
        models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["policy_version"]


def test_completion_over_http_has_an_id_and_n_choices(server):
    with server.client() as client:
        body = complete(client, n=3, max_tokens=6)
    assert body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 3 <= body["usage"]["completion_tokens"] <= 3 * 6


def test_a_seed_makes_a_completion_reproducible(server):
    with server.client() as client:
        first, again = (complete(client, n=2, max_tokens=12, seed=1234) for _ in range(2))
        other = complete(client, n=2, max_tokens=12, seed=4321)
    assert first["id"] != again["id"]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert [c["text"] for c in first["choices"]] != [c["text"] for c in other["choices"]]


def test_stop_string_cuts_the_text(server):
    with server.client() as client:
        full = complete(client, max_tokens=12, temperature=0)["choices"][0]
        stop = " " + full["text"].split()[2]
        cut = complete(client, max_tokens=12, temperature=0, stop=[stop, "never appears"])["choices"][0]
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["finish_reason"] == "stop"


def sse_events(response: httpx.Response) -> list:
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events
    return [json.loads(event) for event in events[:-1]]


def test_streamed_completion_is_the_unstreamed_one_in_pieces(server):
    request = {"model": MODEL, "prompt": "my day is", "max_tokens": 12, "seed": 7, "n": 2}
    with server.client() as client:
        whole = client.post("/v1/completions", json=request).json()
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = sse_events(response)
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        assert chunk["id"] == chunks[0]["id"] and chunk["object"] == "text_completion"
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    assert texts == [c["text"] for c in whole["choices"]]
    assert finishes == [c["finish_reason"] for c in whole["choices"]]


def test_openai_client_completions_chat_and_streaming(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]

    completion = client.completions.create(model=MODEL, prompt="the food is", max_tokens=8, n=2, seed=3)
    assert completion.id.startswith("cmpl-") and len(completion.choices) == 2
    assert completion.usage.prompt_tokens == 3

    chat = client.chat.completions.create(model=MODEL, max_tokens=8, seed=5, messages=[
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "the movie"}])
    assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model=MODEL, max_tokens=8, seed=5, stream=True, messages=[
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "the movie"}])
    chunks = list(stream)
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    stream = client.completions.create(model=MODEL, prompt="the food is", max_tokens=8, seed=3, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens >= 1

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_32_concurrent_requests_are_all_answered(server):
    async def one(client: httpx.AsyncClient, i: int):
        request = {"model": MODEL, "prompt": ["the movie was", "my day is very", "i think"][i % 3],
                   "max_tokens": 4 + i % 8, "seed": i}
        if i % 4 == 3:  # a streaming request in the same batches
            async with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                lines = [line async for line in response.aiter_lines()]
                return response.status_code, lines[-2] == "data: [DONE]"
        response = await client.post("/v1/completions", json=request)
        return response.status_code, response.json()["id"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(all_of_them())
    assert [status for status, _ in results] == [200] * 32
    ids = [result for _, result in results if isinstance(result, str)]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert all(result is True for _, result in results if not isinstance(result, str))


BAD_REQUESTS = [
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", {"prompt": "a"}, 400, "model: Field required"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "n": "2"}, 400, "n: Input should be a valid integer"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"model": "other-model", "prompt": "a"}, 404, "not found"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 33}, 400, "at most 32"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "the " * 120}, 400, "too long"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a " * 600_000}, 413, "larger than"),
    ("POST", "/v1/completions", b'{"model": "tiny-policy", "prompt": "a \\ud800"}', 400, "prompt: character 2"),
    ("POST", "/v1/feedback", b'{"completion_id": "x", "rating": 4, "comment": "\\udfff"}', 400, "comment: character 0"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "content"),
    ("POST", "/v1/feedback", {"completion_id": "cmpl-unknown", "rating": 4}, 404, "no completion"),
    ("POST", "/v1/feedback", {"completion_id": "cmpl-x", "rating": 0}, 400, "rating"),
    ("POST", "/v1/feedback", {"completion_id": "cmpl-x", "rating": 4.5}, 400, "rating"),
    ("POST", "/v1/feedback", {"rating": 4}, 400, "completion_id"),
    ("GET", "/v1/completions", None, 405, "not allowed"),
    ("GET", "/v1/nothing-here", None, 404, "no route"),
]


def test_bad_requests_are_answered_4xx_with_a_reason(server):
    wrong = []
    with server.client() as client:
        for method, path, body, status, reason in BAD_REQUESTS:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            response = client.request(method, path, headers={"content-type": "application/json"}, **kwargs)
            error = response.json().get("error", {}) if response.headers["content-type"].startswith(
                "application/json") else {}
            if response.status_code != status or reason not in error.get("message", "") or "Traceback" in response.text:
                wrong.append((method, path, str(body)[:60], response.status_code, response.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))


def test_every_route_but_health_answers_401_without_the_key(server):
    with server.client(headers={}) as anonymous:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/feedback"), ("GET", "/docs"), ("GET", "/openapi.json")]:
            for headers in ({}, {"Authorization": "Bearer not-the-key"}):
                response = anonymous.request(method, path, headers=headers, json={"model": MODEL, "prompt": "a"})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
        assert anonymous.get("/health").status_code == 200


STALLED = 256  # uploads that stop half-way: 4 x the model replica's max_ongoing_requests (64)


def stalled_upload(port: int) -> socket.socket:
    """A POST whose headers promise 1000 bytes of body, of which 10 are sent; then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    sock.sendall(head.encode() + b'{"model": ')
    return sock


def ongoing_requests(deployment: str) -> int:
    """Requests the replicas of `deployment` hold now (Serve's own count: what max_ongoing_requests bounds)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]
    return sum(ray.get([ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote() for name in names]))


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


def first_answers(sockets: list[socket.socket], timeout_s: float) -> list[str]:
    """Per socket, the status line of its answer ("HTTP/1.1 408 ...") or "closed"; "" if none came in time."""
    answers, received = [""] * len(sockets), [b""] * len(sockets)
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(sockets):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout_s
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                i = key.data
                try:
                    chunk = key.fileobj.recv(4096)
                except ConnectionError:
                    chunk = b""
                received[i] += chunk
                if b"\r\n" in received[i] or not chunk:
                    answers[i] = received[i].split(b"\r\n")[0].decode() if received[i] else "closed"
                    selector.unregister(key.fileobj)
    return answers


def test_stalled_uploads_hold_no_model_slot_and_are_answered_408(server):
    """256 connections that send headers and part of a body, then go quiet: they wait at the ingress, not
    in the model replica's 64 slots, so /health and a completion are answered meanwhile; after
    body_timeout_s each gets a 408 and its slot is free again."""
    sockets = []
    try:
        for _ in range(STALLED):
            sockets.append(stalled_upload(server.port))
        # every stalled request has reached the ingress and holds one of its slots; none holds a model slot
        wait_until(lambda: ongoing_requests("OpenAIServer") >= STALLED, 30, f"{STALLED} requests at the ingress")
        assert ongoing_requests("PolicyServer") == 0
        with server.client() as client:
            start = time.monotonic()
            assert client.get("/health").json() == {"status": "ok"}
            assert time.monotonic() - start < 5, "/health waited behind the stalled uploads"
            start = time.monotonic()
            assert complete(client, max_tokens=4)["choices"][0]["finish_reason"] in ("stop", "length")
            assert time.monotonic() - start < 30, "a completion waited behind the stalled uploads"
        answers = first_answers(sockets, timeout_s=BODY_TIMEOUT_S + 60)
        assert all(answer.startswith("HTTP/1.1 408") or answer == "closed" for answer in answers), \
            sorted(set(answers))
        assert sum(answer.startswith("HTTP/1.1 408") for answer in answers) >= STALLED // 2, sorted(set(answers))
        wait_until(lambda: ongoing_requests("OpenAIServer") == 0, 30, "the ingress freed the stalled requests")
    finally:
        for sock in sockets:
            sock.close()


def post_feedback(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/feedback", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_acknowledged_feedback_survives_a_server_restart(server):
    acknowledged, completions = [], []
    with server.client() as client:
        for i in range(4):
            body = complete(client, n=2, max_tokens=6, seed=100 + i)
            completions.append(body)
            acknowledged.append(post_feedback(client, completion_id=body["id"], rating=1 + i, comment=f"note {i}"))
            acknowledged.append(post_feedback(client, completion_id=body["id"], choice_index=i % 2))

    server.restart()

    store = FeedbackStore(server.config.feedback_db, readonly=True)
    stored = {record["id"]: record for record in store.feedback_records()}
    store.close()
    for ack in acknowledged:
        record = stored[ack["id"]]
        assert (record["completion_id"], record["kind"]) == (ack["completion_id"], ack["kind"])
    for i, body in enumerate(completions):
        [rating] = [stored[a["id"]] for a in acknowledged if a["completion_id"] == body["id"] and a["kind"] == "rating"]
        assert (rating["rating"], rating["comment"]) == (1 + i, f"note {i}")
        assert rating["response"] == body["choices"][0]["text"]
        assert rating["prompt"] == "the movie was" and rating["policy_version"] == body["system_fingerprint"]
    with server.client() as client:  # the restarted server still knows the completions
        assert post_feedback(client, completion_id=completions[0]["id"], rating=5)["kind"] == "rating"


def test_serve_feedback_export_writes_the_preference_dataset(server, tmp_path):
    with server.client() as client:
        body = client.post("/v1/chat/completions", json={
            "model": MODEL, "n": 3, "max_tokens": 6, "seed": 11,
            "messages": [{"role": "user", "content": "the weather today"}]}).json()
        post_feedback(client, completion_id=body["id"], choice_index=1)
        post_feedback(client, completion_id=body["id"], choice_index=2, rating=4)
    texts = [choice["message"]["content"] for choice in body["choices"]]

    assert main(["feedback", "export", server.config.feedback_db, "--out", str(tmp_path)]) == 0
    pairs = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    ours = [pair for pair in pairs if pair["prompt"] == "user: the weather today\nassistant:"]
    assert [(p["chosen"], p["rejected"]) for p in ours] == [(texts[1], texts[0]), (texts[1], texts[2])]
    for pair in ours:  # each pair traces back to the completion it judged and how it was sampled
        assert (pair["source"], pair["annotator"], pair["completion_id"]) == ("api", None, body["id"])
        assert pair["policy_version"] == body["system_fingerprint"] and pair["model"] == MODEL
        assert (pair["sampling"]["n"], pair["sampling"]["max_tokens"], pair["sampling"]["seed"]) == (3, 6, 11)
    ratings = [json.loads(line) for line in (tmp_path / "ratings.jsonl").read_text().splitlines()]
    [rated] = [r for r in ratings if r.get("completion_id") == body["id"]]
    assert (rated["response"], rated["rating"], rated["source"]) == (texts[2], 4, "api")
    stats = json.loads((tmp_path / "rating_stats.json").read_text())
    assert stats["count"] == len(ratings) and 1 <= stats["mean"] <= 5


def test_feedback_trains_the_next_reward_model(server, tmp_path):
    """Serve -> users choose among n choices -> export -> the reward-model stage trains on what they chose."""
    from rlhf_ray.rewards import RewardModelScorer

    with server.client() as client:
        for seed in (21, 22):
            body = complete(client, n=2, max_tokens=6, seed=seed)
            if body["choices"][0]["text"] != body["choices"][1]["text"]:
                post_feedback(client, completion_id=body["id"], choice_index=1)
    assert main(["feedback", "export", server.config.feedback_db, "--out", str(tmp_path / "fb")]) == 0
    pairs = [json.loads(line) for line in (tmp_path / "fb" / "preferences.jsonl").read_text().splitlines()]
    assert pairs
    # the server's Ray is reused: the stage runs as a Ray Train job next to the serving replica
    assert main(["pipeline", "experiments/pipeline.yaml", "--stages", "reward_model", f"output_dir={tmp_path}",
                 f"reward_model.data.path={tmp_path / 'fb' / 'preferences.jsonl'}", "reward_model.batch_size=1",
                 "reward_model.eval_fraction=0", "reward_model.epochs=1"]) == 0
    folder = tmp_path / "pipeline" / "reward_model"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["train_pairs"] == len(pairs) and summary["steps"] == len(pairs)
    assert not (tmp_path / "pipeline" / "sft").exists() and not (tmp_path / "pipeline" / "metrics.jsonl").exists()
    scores = RewardModelScorer(folder)([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert scores.shape == (len(pairs),) and np.isfinite(scores).all()
