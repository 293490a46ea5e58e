"""The `loop:` section: `rlhf-ray loop` keeps a policy served and, round after round, trains, evaluates,
gates and deploys the next version from the feedback the served one collected."""

from __future__ import annotations

from pydantic import Field

from rlhf_ray.config.section import _Section


class HumanGateConfig(_Section):
    """A blind study of the candidate against the served version on the pages' /ui/eval, in the gate: the
    round queues the eval's first `prompts` held-out prompts (both answers already sampled by the eval), each
    for `labels_per_item` people, and waits at most `wait_minutes` for every judgement."""

    prompts: int = Field(16, ge=1)
    labels_per_item: int = Field(2, ge=1)  # two or more: Cohen's kappa between people
    min_win_rate: float = Field(0.5, ge=0.0, le=1.0)  # the people's win rate of the candidate (ties 1/2)
    wait_minutes: float = Field(60.0, gt=0.0)  # a study not complete by then rejects the candidate


class GateConfig(_Section):
    """What a candidate must reach against the served version on held-out prompts to be deployed."""

    min_win_rate: float = Field(0.55, ge=0.0, le=1.0)  # the judge's win rate (ties 1/2) at least this
    max_kl: float | None = Field(None, gt=0.0)  # and the KL to the served version (nats) at most this
    human: HumanGateConfig | None = None  # and, when set, people's blind study


class LoopConfig(_Section):
    feedback_db: str = "{run}/feedback.db"  # the served policy's feedback database
    min_new_feedback: int = Field(50, ge=1)  # a round starts once this many new feedback records and labels are in
    every_minutes: float | None = Field(None, gt=0.0)  # ...or this long after the last round, if any are new
    rounds: int | None = Field(None, ge=1)  # stop after this many rounds; None: run until interrupted
    poll_s: float = Field(5.0, gt=0.0)  # how often the database is read while waiting
    judge: str | None = None  # reward spec of the automatic judge; None: the run's reward
    eval_prompts: int = Field(64, ge=1)  # held-out prompts of data.eval_dataset for the gate
    gate: GateConfig = GateConfig()
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    serve: dict = {}  # ServeConfig fields (model_name, api_key, num_cpus, max_batch_size, ...)
