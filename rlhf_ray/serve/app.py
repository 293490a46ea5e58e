"""The Ray Serve application: a light HTTP ingress in front of autoscaled, batching model replicas, and one
feedback-store replica that owns the SQLite file.

    HTTP ──► Serve proxy ──► OpenAIServer × ingress_replicas   (FastAPI app of serve/api.py, no CPU)
                                 │  whole, checked, tokenised requests only (DeploymentHandle, streamed)
                                 ├──► PolicyServer × [min_replicas, max_replicas]
                                 │      DecodeLoop: each request joins the running batch at the next step
                                 └──► FeedbackStoreServer × 1   (SQLite WAL; @serve.batch groups commits)

Why two deployments: Ray Serve's proxy (ray/serve/_private/proxy.py, Ray 2.60) hands a request to a
replica as soon as its headers arrive, and the replica pulls the body from the proxy afterwards
(`receive_asgi_messages`); the request holds one of the replica's `max_ongoing_requests` slots all that
time. Were the model replica the ingress, 64 uploads that stop half-way would hold all of its slots and
nothing, /health included, would be answered. The ingress has thousands of slots that cost an idle
coroutine each, reads every body within `body_timeout_s` (408 beyond), answers /health and /v1/models
itself, and takes a model slot only for a request that is whole and valid.

Build the application with `build_app(ServeConfig(...))`, or let Serve call `app_builder` from a config
file (`serve run cluster/serve_config.yaml`, `serve deploy ...`), whose `args` are the fields of
`ServeConfig`.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve import Application

from rlhf_ray.serve.api import build_api
from rlhf_ray.serve.config import PolicyUpdate, ServeConfig
from rlhf_ray.serve.decode_loop import DecodeLoop, GenerationJob
from rlhf_ray.serve.feedback_store import STORE_OPS, FeedbackError, FeedbackStore
from rlhf_ray.serve.text import PolicyVersion

APP_NAME = "rlhf-ray"
DRAIN_TIMEOUT_S = 600.0  # a replaced policy's jobs in flight get this long before its thread is left to them


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class FeedbackStoreServer:
    """The single writer of the feedback database (one replica: SQLite wants one writer on a local disk)."""

    def __init__(self, db_path: str):
        # one thread owns the connection; commits (fsync) wait there, not in the event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-db")
        self.store = FeedbackStore(db_path)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def record(self, records: list) -> list[None]:
        """Store completions; concurrent calls share one transaction (group commit)."""
        await self._run(self.store.record_completions, records)
        return [None] * len(records)

    async def call(self, op: str, kwargs: dict) -> dict:
        """{"result": FeedbackStore.<op>(**kwargs)} once committed, or {"error": {status, message, param}}: an
        exception would reach the caller wrapped in Ray's error types."""
        if op not in STORE_OPS:
            raise ValueError(f"{op!r} is not a feedback store operation of {STORE_OPS}")
        try:
            return {"result": await self._run(lambda: getattr(self.store, op)(**kwargs))}
        except FeedbackError as err:
            return {"error": {"status": err.status, "message": err.message, "param": err.param}}

    def __del__(self):
        self.store.close()


@serve.deployment
class PolicyServer:
    """One model replica: the policy, its engine and the decode loop that runs every request in flight as
    one batch (continuous batching: a request joins at the next step, `max_batch_size` rows at most).

    A new policy arrives as the deployment's `user_config` ({"policy", "policy_version"}, a lightweight
    update: the replica stays up). `reconfigure` loads it beside the serving one and then switches: requests
    already decoding finish on the old policy, later ones get the new one, and each response names its
    version."""

    def __init__(self, config: dict):
        import torch

        from rlhf_ray.decoding import keep_freed_memory
        from rlhf_ray.serve.policy import policy_version

        self.config = ServeConfig.model_validate(config)
        # as many intra-op threads as CPUs reserved: more only contend with the other replicas
        torch.set_num_threads(max(1, int(self.config.num_cpus)))
        keep_freed_memory()  # each decoding step's (B, V) tensors reuse the last step's memory
        self.policy = self.config.policy
        self.policy_version = self.config.policy_version or policy_version(self.policy)
        self.decode_loop = self._decode_loop(self.policy)

    def _decode_loop(self, policy: str) -> DecodeLoop:
        import torch

        from rlhf_ray.models import load_policy
        from rlhf_ray.serve.engine import GenerationEngine

        device = "cuda" if self.config.num_gpus > 0 else "cpu"
        model, tokenizer = load_policy(policy, dtype=getattr(torch, self.config.dtype), device=device)
        engine = GenerationEngine(model, tokenizer, max_rows=self.config.max_batch_size)
        # one thread runs the decoding steps; the event loop keeps taking requests meanwhile
        return DecodeLoop(engine, ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode"))

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this at start and on each change of `user_config`: serve the policy it names."""
        update = PolicyUpdate.model_validate(user_config or {})
        if update.policy is None or (update.policy == self.policy
                                     and update.policy_version in (None, self.policy_version)):
            return  # already served
        # loading takes seconds: in a thread, while this replica's loop goes on answering
        loop = await asyncio.get_running_loop().run_in_executor(None, self._decode_loop, update.policy)
        version = update.version()
        old, self.decode_loop = self.decode_loop, loop
        self.policy, self.policy_version = update.policy, version
        asyncio.get_running_loop().create_task(old.close_when_idle(timeout_s=DRAIN_TIMEOUT_S))

    def serving(self, weights: bool = False) -> dict:
        """What this replica serves, and which replica it is (a swap keeps the replica); with `weights`, the
        sha256 of the served parameters (`rlhf_ray.models.parameters_digest`)."""
        import os

        from rlhf_ray.models import parameters_digest

        answer = {"policy": self.policy, "policy_version": self.policy_version, "pid": os.getpid(),
                  "replica": serve.get_replica_context().replica_id.unique_id}
        if weights:
            answer["weights"] = parameters_digest(self.decode_loop.engine.model)
        return answer

    async def generate(self, job: GenerationJob):
        """The job's policy version, then (choice, delta) lists as `Backend.generate` yields them (called
        with `stream=True`). The job stays on the loop it started on."""
        decode_loop, version = self.decode_loop, self.policy_version
        yield PolicyVersion(version)
        async for outputs in decode_loop.generate(job):
            yield outputs


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIServer:
    """The HTTP ingress: the FastAPI app of `api.build_api` over the tokenizer (to check requests), the
    model deployment (to sample them) and the feedback store."""

    def __init__(self, config: dict, model, store):
        from rlhf_ray.serve.policy import model_name, policy_version
        from rlhf_ray.serve.prompts import PromptCodec

        self.config = ServeConfig.model_validate(config)
        self.prompts = PromptCodec.load(self.config.policy)
        self.model_name = self.config.model_name or model_name(self.config.policy)
        self.policy_version = self.config.policy_version or policy_version(self.config.policy)
        self.created = int(time.time())
        self.context_length = self.prompts.context_length
        self.model, self.store = model.options(stream=True), store

    def __serve_build_asgi_app__(self):
        return build_api(self, self.config)

    def reconfigure(self, user_config: dict) -> None:
        """The served version for /v1/models (each response names the version that decoded it)."""
        update = PolicyUpdate.model_validate(user_config or {})
        if update.policy is not None:
            self.policy_version = update.version()

    # the Backend protocol of serve/api.py

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.prompts.chat_prompt(messages)

    async def generate(self, job: GenerationJob):
        outputs = self.model.generate.remote(job)
        finished = False
        try:
            async for deltas in outputs:
                yield deltas
            finished = True
        finally:
            if not finished:  # the client left (or the stream broke): free the model's rows at once
                outputs.cancel()

    async def record(self, record) -> None:
        await self.store.record.remote(record)

    async def call_store(self, op: str, **kwargs):
        answer = await self.store.call.remote(op, kwargs)
        if "error" in answer:
            raise FeedbackError(answer["error"]["status"], answer["error"]["message"], answer["error"]["param"])
        return answer["result"]


def build_app(config: ServeConfig, update: PolicyUpdate | None = None) -> Application:
    """The Serve application for `config`: replicas, autoscaling and batching as configured. With `update`,
    the policy it names replaces `config.policy` through `reconfigure`: running `serve.run` again with the
    same `config` and another update swaps the served policy without restarting a replica."""
    fields = config.model_dump(mode="json")
    user_config = update.model_dump(mode="json") if update is not None else None
    store = FeedbackStoreServer.options(
        ray_actor_options={"num_cpus": 0, "resources": dict(config.store_resources)},
    ).bind(config.feedback_db)
    model = PolicyServer.options(
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "initial_replicas": max(config.min_replicas, 1),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        user_config=user_config,
    ).bind(fields)
    return OpenAIServer.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        user_config=user_config,
    ).bind(fields, model, store)


def app_builder(args: ServeConfig) -> Application:
    """The import path of Serve config files (`rlhf_ray.serve.app:app_builder`); Serve validates `args`
    against `ServeConfig` (the annotation, evaluated: no `from __future__ import annotations` in this
    module), so an unknown or ill-typed field fails the deploy with its name."""
    return build_app(args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args))
