"""`rlhf-ray scale RUN --rollout-workers K`: change a running run's rollout capacity."""

from __future__ import annotations

import logging

import ray

from rlhf_ray.rollout.elastic import NAMESPACE, find_control

CONTROL_TIMEOUT_S = 60.0


def scale(run_name: str, rollout_workers: int, address: str | None = "auto") -> dict:
    """Set the run's rollout-worker target; returns the run's control status.

    Raises ConnectionError when no Ray cluster is reachable at `address` and ValueError when the
    cluster has no running run of that name.
    """
    if rollout_workers < 1:
        raise ValueError(f"--rollout-workers must be >= 1, got {rollout_workers}")
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    control = find_control(run_name)
    try:  # the control actor lives on the run's driver node and answers at once
        return ray.get(control.set_rollout_workers.remote(rollout_workers), timeout=CONTROL_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ConnectionError(f"run {run_name!r} did not answer the scale request within {CONTROL_TIMEOUT_S:g} s "
                              "(its driver may be busy or gone)") from None
