"""`rlhf-ray train`: one PPO run, from a config to `runs/<name>/`.

The driver starts a local Ray (or joins one), starts the rollout pool, runs the learner as a Ray
Train `TorchTrainer` (gloo on CPU, NCCL on GPU), and follows `metrics.jsonl` to draw a progress bar
with the reward and the KL of each iteration.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import ray
from ray.autoscaler.sdk import request_resources

from rlhf_ray.config import RunConfig, dump_config
from rlhf_ray.errors import stop_reason
from rlhf_ray.learner.distributed import deepspeed_worker_env
from rlhf_ray.learner.launch import describe_failure, learner_group
from rlhf_ray.learner.driver import log_event
from rlhf_ray.learner.train_loop import ppo_train_loop
from rlhf_ray.pipeline.preflight import preflight
from rlhf_ray.rollout.elastic import start_control
from rlhf_ray.rollout.pool import PoolLimits, RolloutPool, WorkerSpec
from rlhf_ray.rollout.run_sampler import reward_spec, sampling_params


# weight-loading progress bars of every worker would bury the run's own progress bar
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


class TrainingError(RuntimeError):
    """The run failed; the message is the cause in one line, `log` the file with its traceback (if any)."""

    def __init__(self, message: str, log: str | None = None):
        super().__init__(message)
        self.log = log


def start_ray(config: RunConfig, address: str | None, extra_cpus: float = 0.0) -> None:
    """Connect to `address`, or start a local Ray with CPUs for the learner, the rollout workers and
    `extra_cpus` more (`rlhf-ray loop`'s model replicas)."""
    if ray.is_initialized():
        return
    env = {"env_vars": {**deepspeed_worker_env(config.learner.use_gpu), **QUIET_ENV}}
    address = address or os.environ.get("RAY_ADDRESS")  # as Ray's own bare ray.init() would
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # A local Ray gets the machine's cores, or more logical CPUs when the run asks for more learner
    # ranks and rollout workers than cores (they then share cores); GPUs are what the machine has.
    # address="local": a new instance even when a `ray start` cluster runs on this machine, which a bare
    # ray.init() would join (and then refuse num_cpus).
    needed = (config.learner.num_workers * config.learner.cpus_per_worker
              + config.rollout.workers.max * config.rollout.num_cpus + extra_cpus)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), runtime_env=env, log_to_driver=True)


def check_resources(config: RunConfig) -> None:
    """Fail at once, naming the config key, when the cluster can never place the run (not a hang)."""
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 0)
    if config.learner.use_gpu and gpus < config.learner.num_workers:
        raise TrainingError(f"learner.use_gpu is true with learner.num_workers={config.learner.num_workers}, "
                            f"but the Ray cluster has {gpus:g} GPU(s)")
    if config.rollout.use_gpu and gpus < config.rollout.workers.min:
        raise TrainingError(f"rollout.use_gpu is true with rollout.workers.min={config.rollout.workers.min}, "
                            f"but the Ray cluster has {gpus:g} GPU(s)")
    for section, per_actor, count in (("learner", config.learner.resources, config.learner.num_workers),
                                      ("rollout", config.rollout.resources, config.rollout.workers.min)):
        for name, amount in per_actor.items():
            if total.get(name, 0) < amount * count:
                raise TrainingError(f"{section}.resources asks for {name}={amount:g} for each of {count} "
                                    f"{'ranks' if section == 'learner' else 'workers'}, but the Ray cluster has "
                                    f"{total.get(name, 0):g} {name}")
    learner_cpus = config.learner.num_workers * config.learner.cpus_per_worker
    needed = learner_cpus + config.rollout.workers.min * config.rollout.num_cpus
    if cpus < needed:
        raise TrainingError(f"learner.num_workers={config.learner.num_workers} (x learner.cpus_per_worker="
                            f"{config.learner.cpus_per_worker}) and rollout.workers.min="
                            f"{config.rollout.workers.min} (x rollout.num_cpus={config.rollout.num_cpus:g}) need "
                            f"{needed:g} CPUs, but the Ray cluster has {cpus:g}")


def rollout_pool(config: RunConfig) -> RolloutPool:
    spec = WorkerSpec(policy=config.expand(config.model.policy), reward=reward_spec(config), params=sampling_params(config),
                      max_length=config.rollout.max_length, max_batch=config.rollout.max_batch, dtype=config.model.dtype,
                      use_gpu=config.rollout.use_gpu, num_cpus=config.rollout.num_cpus,
                      torch_threads=config.rollout.torch_threads,
                      actor_options={"resources": dict(config.rollout.resources)} if config.rollout.resources else {})
    rollout = config.rollout
    limits = PoolLimits(start_timeout_s=rollout.start_timeout_s, max_start_failures=rollout.max_start_failures,
                        rollout_timeout_s=rollout.timeout_s, sync_timeout_s=rollout.sync_timeout_s)
    return RolloutPool(spec, num_workers=rollout.workers.min, name=f"{config.name}-rollout", limits=limits)


def follow_metrics(path: Path, total: int, done: threading.Event) -> None:
    """A progress bar over iterations, fed by the lines rank 0 appends to metrics.jsonl."""
    from tqdm import tqdm

    shown, held_out = None, None
    with tqdm(total=total, desc="ppo", unit="it", dynamic_ncols=True) as bar:
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if lines and lines[-1] != shown:  # a resumed run rewrites the file: follow its last line
                shown, metrics = lines[-1], json.loads(lines[-1])
                bar.n = metrics["iteration"]
                held_out = metrics.get("eval/reward_mean", held_out)
                bar.set_postfix(progress_fields(metrics, held_out))
            if done.is_set():
                break
            time.sleep(0.5)


def progress_fields(metrics: dict, held_out: float | None) -> dict[str, str]:
    """What the progress bar shows: the batch's reward, the latest held-out reward (`train.eval_every`; the
    batch's reward follows its prompts), the KL to the reference (when the reference pass ran) and workers."""
    fields = {}
    if "rollout/reward_mean" in metrics:
        fields["reward"] = f"{metrics['rollout/reward_mean']:+.3f}"
    if held_out is not None:
        fields["eval"] = f"{held_out:+.3f}"
    kl = metrics.get("objective/kl", metrics.get("eval/kl"))
    if kl is not None:
        fields["kl"] = f"{kl:.3f}"
    if "pool/workers" in metrics:
        fields["workers"] = str(metrics["pool/workers"])
    return fields


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "eval_samples.jsonl", "tensorboard", "policy", "policy_adapter",
               "ray_train")


def train(config: RunConfig, address: str | None = None, progress: bool = True, fresh: bool = False) -> Path:
    """Run PPO as configured; returns the run folder (`output_dir/name`).

    Everything the user supplies is checked first, on this machine, before Ray starts
    (`rlhf_ray.pipeline.preflight`; a `PreflightError` names what is wrong). A run folder with a complete
    checkpoint is resumed from it (see `rlhf_ray.checkpoint`); `fresh=True` deletes the folder's earlier
    outputs first. A user error during the run (`rlhf_ray.errors`) ends it at once, without a retry, as
    a `TrainingError` whose message is that error's and whose `log` is the traceback's file.
    """
    config = config.with_absolute_paths()
    report = preflight(config, stages=("ppo",))
    run_dir = Path(config.run_dir)
    if fresh:
        for name in (*RUN_OUTPUTS, "events.jsonl", "error.log"):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    started = time.perf_counter()
    start_ray(config, address)
    # where the start-up goes (with the learner_start event's load_s and the first iteration's times)
    log_event(run_dir, "launch", preflight_s=report.seconds, ray_start_s=time.perf_counter() - started)
    check_resources(config)
    workers = config.rollout.workers
    control = start_control(config.name, workers.min, workers.max)
    pool = rollout_pool(config)
    # ask an autoscaling cluster for room for the largest pool (a no-op where nothing autoscales)
    request_resources(bundles=[pool.demand] * workers.max)
    trainer = learner_group(ppo_train_loop, {"config": config.model_dump(mode="json"), "pool": pool, "control": control,
                                             "run_dir": str(run_dir)},
                            config.learner, "learner", run_dir / "ray_train", max_failures=config.train.max_failures)
    done = threading.Event()
    follower = threading.Thread(target=follow_metrics, args=(run_dir / "metrics.jsonl", config.train.iterations, done),
                                daemon=True)
    if progress:
        follower.start()
    try:
        trainer.fit()
        stopped = ray.get(control.stopped.remote(), timeout=60)
    except ray.train.TrainingFailedError as err:
        retried = "" if stop_reason(err) else (f"the learner failed after train.max_failures="
                                               f"{config.train.max_failures} restarts: ")
        raise TrainingError(retried + describe_failure(err)) from err
    finally:
        done.set()
        if progress:
            follower.join(timeout=5)
        pool.shutdown()
        ray.kill(control)
    if stopped is not None:  # the learner ended the run on a user error or a bound (nothing was retried)
        raise TrainingError(stopped["message"], log=stopped["log"])
    return run_dir
