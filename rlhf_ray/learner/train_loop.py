"""The PPO loop of one Ray Train worker (one data-parallel learner rank).

Rank 0 drives the rollout pool: it sends the iteration's prompts out, gets every episode back once,
and broadcasts them to the other ranks; each rank trains on its contiguous shard (whole prompt
groups, for GRPO/RLOO) with DeepSpeed engines for the actor and the critic and a frozen reference.
After the update all ranks gather the full policy (a collective under ZeRO-3) and rank 0 sends it to
every live rollout worker through one object-store copy; the policy version goes up by one.

Rank 0 writes `metrics.jsonl` (one object per iteration), TensorBoard events, checkpoints every
`train.checkpoint_every` iterations, the final `policy/` folder, and `events.jsonl` (each start of the
learner, and why a run stopped).

The user's errors are not faults (`rlhf_ray.errors`): a `RunStopped` on rank 0 (a reward that raises or
hangs, a prompt dataset that breaks, rollout workers that cannot start, a wait that ran out) is sent to
every rank in place of the episodes, all ranks leave the loop normally, and rank 0 writes the traceback
to `error.log` and tells the driver through the run's control actor. Ray Train then has nothing to
retry, and the checkpoints already written stay, so the same command resumes once the user's code is
fixed. Everything else that raises is a fault, which Ray Train retries (`train.max_failures`).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
from rlhf_ray.checkpoint import (
    RunState, checkpoint_dir, latest_checkpoint, load_checkpoint, prune_incomplete, save_engines, truncate_metrics,
    write_run_state,
)
from rlhf_ray.config import RunConfig
from rlhf_ray.errors import RunStopped, one_line
from rlhf_ray.learner.distributed import get_rank, get_world_size, use_worker_cpus
from rlhf_ray.learner.engine import (
    EngineConfig, create_engine, create_reference_engine, gather_full_state_dict, learner_engine_config,
)
from rlhf_ray.learner.ppo import Reducer, make_experience, ppo_update
from rlhf_ray.models import load_tokenizer, resolve_model_path
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.value import ValueModel
from rlhf_ray.rollout.elastic import desired_workers
from rlhf_ray.sampling import episode_seed



class DistributedReducer(Reducer):
    """Sums over the Ray Train process group."""

    def __init__(self):
        self.world_size, self.rank = get_world_size(), get_rank()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total, op=op)
        return total


def engine_config(config: RunConfig, world_size: int, lr: float) -> EngineConfig:
    """A PPO model's engine settings: each rank's share of a minibatch per forward/backward."""
    return learner_engine_config(config.learner, lr, config.ppo.minibatch_size // world_size)


def iteration_prompts(config: RunConfig, prompt_ids: list[list[int]], iteration: int) -> tuple[list, list[int]]:
    """The iteration's prompts (each `group_size` times in a row) and one seed per episode.

    Prompts are taken in order and cycled: iteration k starts at position k * batch_size.
    """
    size, group = config.rollout.batch_size, config.ppo.group_size
    start = iteration * size
    indices = [(start + i) % len(prompt_ids) for i in range(size) for _ in range(group)]
    seeds = [episode_seed(config.seed, iteration, j) for j in range(size * group)]
    return [prompt_ids[i] for i in indices], seeds


def scale_pool(pool, control, config: RunConfig) -> None:
    """Grow or shrink the rollout pool towards what the run wants now (`rollout/elastic.py`)."""
    pool.wait_ready(0)
    target = ray.get(control.rollout_target.remote(), timeout=CONTROL_TIMEOUT_S)
    workers = config.rollout.workers
    pool.resize(desired_workers(pool.size, workers.min, workers.max, target, ray.available_resources(), pool.demand))


def broadcast_episodes(episodes, rank: int):
    """Rank 0's episodes (or the `StopMarker` that ends the run) on every rank."""
    box = [episodes if rank == 0 else None]
    if get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class StopMarker:
    """Sent to every rank in place of the episodes: the run ends here, and nothing is retried."""


CONTROL_TIMEOUT_S = 60.0  # the run's control actor lives on the driver's node and answers at once


def log_event(run_dir: Path, event: str, **fields) -> None:
    """One line of `events.jsonl`: the learner's starts (so restarts can be counted) and why a run stopped."""
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def report_stop(stop: RunStopped, run_dir: Path, control, iteration: int) -> None:
    """The traceback to `error.log`, the one-line reason to `events.jsonl` and to the driver."""
    log = run_dir / "error.log"
    log.write_text("".join(traceback.format_exception(stop)))
    message = one_line(stop)
    log_event(run_dir, "stopped", iteration=iteration, error=type(stop).__name__, message=message)
    ray.get(control.report_stop.remote(message, str(log)), timeout=CONTROL_TIMEOUT_S)


def reward_component_means(episodes) -> dict:
    """`reward/<name>`: the mean of each component of a composite reward over the batch (unweighted)."""
    parts = [e.reward_components for e in episodes if e.reward_components is not None]
    if not parts:
        return {}
    return {f"reward/{name}": sum(p[name] for p in parts) / len(parts) for name in parts[0]}


def rollout_timing(chunks) -> dict:
    """Wall time of the rollout chunks (`RolloutChunk`s; they run in parallel: the slowest one counts)."""
    return {"perf/generate_s": max((c.generate_s for c in chunks), default=0.0),
            "perf/scoring_s": max((c.reward_s for c in chunks), default=0.0)}


class MetricsWriter:
    """metrics.jsonl and TensorBoard events, rank 0 only."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and name != "iteration":
                self.tensorboard.add_scalar(name, value, metrics["iteration"])
        self.tensorboard.flush()


def save_policy(export_model, state_dict, tokenizer, path: Path) -> None:
    """A plain Hugging Face folder, written next to `path` and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    export_model.load_state_dict(state_dict)
    export_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)


def ppo_train_loop(loop_config: dict) -> None:
    config = RunConfig.model_validate(loop_config["config"])
    pool, control = loop_config["pool"], loop_config["control"]
    run_dir = Path(loop_config["run_dir"])
    rank, world = get_rank(), get_world_size()
    reducer = DistributedReducer()
    torch.manual_seed(config.seed)
    use_worker_cpus(config.learner.cpus_per_worker, config.learner.use_gpu)
    dtype = DTYPES[config.model.dtype]

    policy_path = resolve_model_path(config.expand(config.model.policy))
    reference_path = resolve_model_path(config.expand(config.model.reference or config.model.policy))
    tokenizer = load_tokenizer(policy_path)
    actor = create_engine(AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype),
                          engine_config(config, world, config.learner.lr), train_batch_size=config.ppo.minibatch_size)
    critic = None
    if config.ppo.advantage_estimator == "gae":
        critic = create_engine(ValueModel.from_pretrained(policy_path, dtype=dtype),
                               engine_config(config, world, config.learner.critic_lr or config.learner.lr),
                               train_batch_size=config.ppo.minibatch_size)
    reference = create_reference_engine(AutoModelForCausalLM.from_pretrained(reference_path, dtype=dtype),
                                        engine_config(config, world, config.learner.lr))
    kl = config.ppo.kl
    kl_controller = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive
                     else FixedKLController(kl.coef))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    temperature = config.rollout.sampling.temperature

    writer = export_model = prompt_ids = None
    stop: RunStopped | None = None  # rank 0: why the run ends; sent to all ranks at the next broadcast
    if rank == 0:
        from rlhf_ray.rollout.run_sampler import prompt_texts

        try:
            prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(config, tokenizer)]
        except RunStopped as err:  # a dataset that breaks here (the driver's preflight read it whole)
            stop = err
        export_model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)

    # Resume: the same command again (or a restart by Ray Train after a lost worker) continues from
    # the last complete checkpoint; the iterations after it are run again, exactly as they first were.
    state = RunState(kl_controller=kl_controller.state_dict())
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        state = load_checkpoint(latest, actor, critic, generator, rank)
        kl_controller.load_state_dict(state.kl_controller)
    state_dict = gather_full_state_dict(actor, dtype=torch.float32)
    if rank == 0:
        prune_incomplete(run_dir, keep_after=state.iteration)
        truncate_metrics(run_dir / "metrics.jsonl", state.iteration)
        writer = MetricsWriter(run_dir)
        log_event(run_dir, "learner_start", iteration=state.iteration, resumed_from=str(latest) if latest else None)
        if latest is not None:
            print(f"resuming from {latest} (iteration {state.iteration}, policy version {state.policy_version})")
            if stop is None:
                try:
                    pool.set_weights(state_dict, state.policy_version)
                except RunStopped as err:
                    stop = err

    next_rollout = None  # rank 0, rollout.overlap: the next iteration's episodes, on their way
    for iteration in range(state.iteration, config.train.iterations):
        started = time.perf_counter()
        episodes, chunks = None, []
        if rank == 0 and stop is None:
            try:
                if next_rollout is None:  # not sent out while the learner trained on the last iteration
                    scale_pool(pool, control, config)
                    next_rollout = pool.submit(*iteration_prompts(config, prompt_ids, iteration))
                episodes, chunks, next_rollout = next_rollout.result(), next_rollout.chunks, None
                if config.rollout.overlap and iteration + 1 < config.train.iterations:
                    # iteration k + 1 is generated with the weights of now while the learner trains on k
                    scale_pool(pool, control, config)
                    next_rollout = pool.submit(*iteration_prompts(config, prompt_ids, iteration + 1))
                control.report_workers.remote(len(pool))
            except RunStopped as err:
                stop = err
        rollout_s = time.perf_counter() - started
        episodes = broadcast_episodes(StopMarker() if stop is not None else episodes, rank)
        if isinstance(episodes, StopMarker):
            break
        per_rank = len(episodes) // world
        shard = episodes[rank * per_rank:(rank + 1) * per_rank]
        # episodes of an older policy than the learner's (overlap, or a chunk re-sent after new weights)
        staleness = state.policy_version - min(e.policy_version for e in episodes)

        t = time.perf_counter()
        experience, metrics = make_experience(shard, actor, critic, reference, config.ppo, kl_controller.value,
                                              temperature, tokenizer.pad_token_id, reducer,
                                              config.learner.micro_batch_tokens, proximal=staleness > 0)
        experience_s = time.perf_counter() - t
        t = time.perf_counter()
        metrics.update(ppo_update(actor, critic, experience, config.ppo, kl_controller.value, temperature,
                                  generator, reducer, config.learner.micro_batch_tokens))
        update_s = time.perf_counter() - t
        kl_controller.update(metrics["objective/kl"], n_steps=len(episodes))

        t = time.perf_counter()
        state_dict = gather_full_state_dict(actor, dtype=torch.float32)
        state = RunState(iteration=iteration + 1, policy_version=state.policy_version + 1,
                         data_position=(iteration + 1) * config.rollout.batch_size,
                         kl_controller=kl_controller.state_dict())
        if rank == 0:
            try:
                pool.set_weights(state_dict, state.policy_version)
            except RunStopped as err:  # the other ranks learn of it at the next broadcast; the checkpoint stays
                stop = err
        sync_s = time.perf_counter() - t  # gather (a collective under ZeRO-3) + broadcast to workers
        learner_tokens = int(reducer.sum(experience.batch.attention_mask.sum())) * config.ppo.epochs

        if rank == 0:
            response_tokens = int(sum(len(e.response_ids) for e in episodes))
            metrics.update({
                "iteration": state.iteration, "policy_version": state.policy_version, "pool/workers": len(pool),
                "rollout/staleness": staleness,
                "perf/rollout_s": rollout_s, **reward_component_means(episodes), **rollout_timing(chunks), "perf/experience_s": experience_s,
                "perf/update_s": update_s, "perf/sync_s": sync_s,
                "perf/iteration_s": time.perf_counter() - started,
                "perf/rollout_tokens_per_s": response_tokens / max(rollout_s, 1e-9),
                "perf/learner_tokens_per_s": learner_tokens / max(update_s, 1e-9),
            })
            writer.write(metrics)

        if state.iteration % config.train.checkpoint_every == 0 or state.iteration == config.train.iterations:
            path = checkpoint_dir(run_dir, state.iteration)
            save_engines(path, actor, critic, generator, rank)
            if world > 1:
                dist.barrier()
            if rank == 0:
                save_policy(export_model, state_dict, tokenizer, path / "policy")
                write_run_state(path, state)
    if rank == 0 and stop is not None:
        report_stop(stop, run_dir, control, state.iteration)
    elif rank == 0:
        save_policy(export_model, state_dict, tokenizer, run_dir / "policy")
