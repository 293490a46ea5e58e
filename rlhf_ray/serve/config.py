"""The configuration of the policy server: one typed model, shared by `rlhf-ray serve`, the Serve config
file (`cluster/serve_config.yaml`, whose `args` are validated against it by Ray Serve) and the RayService.

Every bound a client could push against (request bytes, tokens, choices, stop strings) is a field here, so
an operator reads the server's limits in one place.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

API_KEY_ENV = "RLHF_RAY_API_KEY"


class PolicyUpdate(BaseModel):
    """The deployments' `user_config`: a policy that replaces `ServeConfig.policy` without a restart."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None  # a policy folder; None: the one of ServeConfig
    policy_version: str | None = None  # None: derived from the folder, as ServeConfig.policy_version

    def version(self) -> str:
        """The version it serves: `policy_version`, else the one derived from the policy folder."""
        from rlhf_ray.serve.policy import policy_version

        return self.policy_version or policy_version(self.policy)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: str = "rlhf-ray/tiny-gpt2"  # a Hugging Face folder (runs/<name>/policy) or a built-in model name
    model_name: str | None = None  # the id clients send as `model`; None: the run name (see policy.describe_policy)
    policy_version: str | None = None  # recorded with every completion; None: derived from the folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    feedback_db: str = "feedback.db"  # SQLite file of completions and feedback (node-local disk: WAL needs it)

    # security; the key is read from the environment variable when `api_key` is None, so it can come from a
    # Kubernetes Secret instead of a config file
    api_key: str | None = None
    api_key_env: str = API_KEY_ENV

    # request bounds
    max_request_bytes: int = Field(1 << 20, ge=1024)
    body_timeout_s: float = Field(10.0, gt=0)  # a request body must arrive within this (408 beyond)
    max_tokens_limit: int = Field(256, ge=1)  # largest max_tokens a request may ask for
    default_max_tokens: int = Field(16, ge=1)  # max_tokens when a request gives none (OpenAI's default)
    max_choices: int = Field(8, ge=1)  # n x number of prompts, per request
    max_stop: int = Field(4, ge=0)  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = Field(64, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: the model's context less max_tokens

    # replicas and batching
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)  # per replica; the autoscaler adds replicas above it
    max_ongoing_requests: int = Field(64, ge=1)  # per model replica; beyond it requests wait at the ingress
    num_cpus: float = Field(1.0, ge=0)  # Ray CPUs per model replica
    num_gpus: float = Field(0.0, ge=0)
    # sequences a model replica decodes at once (a request's n choices are n of them; 1: no batching); a
    # request joins the running batch at the next step once a row is free (continuous batching)
    max_batch_size: int = Field(16, ge=1)
    store_resources: dict[str, float] = {}  # custom Ray resources that place the feedback store (its disk)

    # the HTTP ingress (no CPU reserved): it holds each request until its whole body has arrived, so a slow
    # or stalled upload costs one of these slots (an idle coroutine), never a model replica's
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(4096, ge=1)  # per ingress replica; open requests, bodies included

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        ingress, model = (self.ingress_replicas * self.ingress_max_ongoing_requests,
                          self.max_replicas * self.max_ongoing_requests)
        if ingress < model:
            raise ValueError(f"ingress_replicas x ingress_max_ongoing_requests ({ingress}) must be >= max_replicas x "
                             f"max_ongoing_requests ({model}), or the model replicas never fill")
        return self

    def resolved_api_key(self) -> str | None:
        """The key every route but /health asks for; None or empty: no authentication."""
        return self.api_key or os.environ.get(self.api_key_env) or None


def parse_replicas(text: str) -> tuple[int, int]:
    """`"2"` -> (2, 2); `"1:4"` -> (1, 4)."""
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high if sep else low))
    except ValueError:
        raise ValueError(f"replicas {text!r} is not N or MIN:MAX (integers)") from None
    if bounds[0] < 0 or bounds[1] < 1 or bounds[0] > bounds[1]:
        raise ValueError(f"replicas {text!r}: expected 0 <= MIN <= MAX and MAX >= 1")
    return bounds
