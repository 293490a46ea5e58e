"""The Ray Serve application: an autoscaled, batching model deployment behind a FastAPI ingress, and one
feedback-store replica that owns the SQLite file.

    HTTP ──► Serve proxy ──► OpenAIServer × [min_replicas, max_replicas]   (FastAPI app of serve/api.py)
                                 │ @serve.batch: concurrent requests → one GenerationEngine batch
                                 ▼
                             FeedbackStoreServer × 1   (SQLite WAL; @serve.batch groups commits)

Both are thin: the model replica loads the policy and hands batches to `api.batch_outputs`; the store
replica calls `FeedbackStore`. Build the application with `build_app(ServeConfig(...))`, or let Serve call
`app_builder` from a config file (`serve run cluster/serve_config.yaml`, `serve deploy ...`), whose `args`
are the fields of `ServeConfig`.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve import Application

from rlhf_ray.serve.api import GenerationJob, batch_outputs, build_api
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.feedback_store import FeedbackError, FeedbackStore

APP_NAME = "rlhf-ray"


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

    async def add_feedback(self, completion_id: str, rating, choice_index, comment) -> dict:
        """The acknowledgement once committed, or {"error": {status, message, param}}: an exception would
        reach the caller wrapped in Ray's error types."""
        try:
            return await self._run(self.store.add_feedback, completion_id, rating, choice_index, comment)
        except FeedbackError as err:
            return {"error": {"status": err.status, "message": err.message, "param": err.param}}

    def __del__(self):
        self.store.close()


@serve.deployment
@serve.ingress()
class OpenAIServer:
    """One replica: the policy, its engine, and the FastAPI app of `api.build_api` over them."""

    def __init__(self, config: dict, store):
        import torch

        from rlhf_ray.models import load_policy
        from rlhf_ray.rollout.decoding import keep_freed_memory
        from rlhf_ray.serve.engine import GenerationEngine
        from rlhf_ray.serve.policy import model_name, policy_version

        self.config = ServeConfig.model_validate(config)
        # as many intra-op threads as CPUs reserved: more only contend with the other replicas
        torch.set_num_threads(max(1, int(self.config.num_cpus)))
        keep_freed_memory()  # each decoding step's (B, V) tensors reuse the last step's memory
        dtype = getattr(torch, self.config.dtype)
        device = "cuda" if self.config.num_gpus > 0 else "cpu"
        model, tokenizer = load_policy(self.config.policy, dtype=dtype, device=device)
        self.engine = GenerationEngine(model, tokenizer)
        self.model_name = self.config.model_name or model_name(self.config.policy)
        self.policy_version = self.config.policy_version or policy_version(self.config.policy)
        self.created = int(time.time())
        self.context_length = self.engine.context_length
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._generate_batch.set_max_batch_size(self.config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_api(self, self.config)

    # the Backend protocol of serve/api.py

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.engine.chat_prompt(messages)

    async def generate(self, job: GenerationJob):
        async for outputs in self._generate_batch(job):
            if outputs is not None:
                yield outputs

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerationJob]):
        async for outputs in batch_outputs(self.engine, jobs, self._executor):
            yield outputs

    async def record(self, record) -> None:
        await self.store.record.remote(record)

    async def add_feedback(self, feedback) -> dict:
        ack = await self.store.add_feedback.remote(feedback.completion_id, feedback.rating, feedback.choice_index,
                                                   feedback.comment)
        if "error" in ack:
            raise FeedbackError(ack["error"]["status"], ack["error"]["message"], ack["error"]["param"])
        return ack


def build_app(config: ServeConfig) -> Application:
    """The Serve application for `config`: replicas, autoscaling and batching as configured."""
    store = FeedbackStoreServer.options(
        ray_actor_options={"num_cpus": 0, "resources": dict(config.store_resources)},
    ).bind(config.feedback_db)
    server = OpenAIServer.options(
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "initial_replicas": max(config.min_replicas, 1),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
    ).bind(config.model_dump(mode="json"), store)
    return server


def app_builder(args: ServeConfig) -> Application:
    """The import path of Serve config files (`rlhf_ray.serve.app:app_builder`); Serve validates `args`
    against `ServeConfig` (the annotation, evaluated: no `from __future__ import annotations` in this
    module), so an unknown or ill-typed field fails the deploy with its name."""
    return build_app(args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args))
