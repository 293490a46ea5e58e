"""The PPO loop of one Ray Train worker (one data-parallel learner rank).

Rank 0 drives the rollout pool: it sends the iteration's prompts out, gets every episode back once,
and broadcasts them to the other ranks; each rank trains on its contiguous shard (whole prompt
groups, for GRPO/RLOO) with DeepSpeed engines for the actor and the critic and a frozen reference.
After the update all ranks gather the full policy (a collective under ZeRO-3) and rank 0 sends it to
every live rollout worker through one object-store copy; the policy version goes up by one.

With `train.eval_every` N, the start policy and every N-th one answer the held-out prompts of
`data.eval_dataset` on the rollout workers, with the same seeds each time; rank 0 logs their reward and the
KL to the reference (`eval/*`): the measure of learning, since each batch's training reward follows that
batch's prompts.

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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
from rlhf_ray.checkpoint import (
    RunState, checkpoint_dir, latest_checkpoint, load_checkpoint, save_engines, write_run_state,
)
from rlhf_ray.config import RunConfig
from rlhf_ray.learner.distributed import (
    DistributedReducer, barrier, broadcast_object, get_rank, get_world_size, use_worker_cpus,
)
from rlhf_ray.learner.driver import RolloutDriver, StopMarker, reward_component_means, timed
from rlhf_ray.learner.engine import (
    AdaptersDisabled, EngineConfig, create_engine, create_reference_engine, gather_full_state_dict,
    learner_engine_config, partitioned_load,
)
from rlhf_ray.learner.ppo import make_experience, ppo_update
from rlhf_ray.models import load_tokenizer, resolve_model_path
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.lora import add_adapters, is_adapter_parameter
from rlhf_ray.models.value import ValueModel


def ppo_train_loop(loop_config: dict) -> None:
    """One learner rank's run: load the models and resume, then per iteration rollout, update, weight sync,
    metrics and checkpoint; at the end the final policy, or why the run stopped (module docstring)."""
    config = RunConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    loading = time.perf_counter()
    learner = load_learner(config)
    learner.load_s = time.perf_counter() - loading
    driver = None
    if learner.rank == 0:
        driver = RolloutDriver(config, loop_config["pool"], loop_config["control"], run_dir, learner)
    state, weights = resume(run_dir, learner, driver)
    if state.iteration == 0 and config.train.eval_every:  # the start policy's held-out score: the "before"
        held_out = evaluate(learner, driver, 0)
        if driver:
            driver.writer.write({"iteration": 0, "policy_version": 0, **held_out})
    for iteration in range(state.iteration, config.train.iterations):
        started, times = time.perf_counter(), {}
        with timed(times, "perf/rollout_s"):
            episodes = driver.collect(iteration) if driver else None
        episodes = broadcast_object(episodes)  # rank 0's episodes, or the StopMarker that ends the run
        if isinstance(episodes, StopMarker):
            break
        metrics, staleness, learner_tokens = train_on(learner, episodes, state.policy_version, times)
        state, weights = publish_policy(learner, driver, state, times)
        if evaluates(config, state.iteration):
            with timed(times, "perf/eval_s"):
                metrics.update(evaluate(learner, driver, state.iteration))
        if driver:
            driver.write_metrics(metrics, state, episodes, staleness, learner_tokens, times, started)
        if state.iteration % config.train.checkpoint_every == 0 or state.iteration == config.train.iterations:
            save_checkpoint(run_dir, learner, driver, state, weights)
    if driver:
        driver.finish(state, weights)


@dataclass
class Learner:
    """This rank's engines and what its updates need (the same on every rank but for `rank`)."""

    config: RunConfig
    rank: int
    world: int
    reducer: DistributedReducer
    policy_path: Path
    tokenizer: Any
    actor: Any  # DeepSpeed engines
    critic: Any | None  # None without GAE
    reference: Any
    kl_controller: AdaptiveKLController | FixedKLController
    generator: torch.Generator  # minibatch shuffling, this rank's own
    torch_threads: int
    load_s: float = 0.0  # seconds to load the models and start their engines


def engine_config(config: RunConfig, world_size: int, lr: float) -> EngineConfig:
    """A PPO model's engine settings: each rank's share of a minibatch per forward/backward."""
    return learner_engine_config(config.learner, lr, config.ppo.minibatch_size // world_size)


def load_learner(config: RunConfig) -> Learner:
    """The actor and (for GAE) critic engines from the policy, the frozen reference, the KL controller and
    the shuffling generator. Torch is seeded first: a run is reproducible from its seed."""
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(config.seed)
    threads = use_worker_cpus(config.learner.cpus_per_worker, config.learner.use_gpu, config.learner.torch_threads,
                              node_is_idle=not config.rollout.overlap)  # the rollout workers wait for the update
    dtype = DTYPES[config.model.dtype]
    policy_path = resolve_model_path(config.expand(config.model.policy))
    reference_path = resolve_model_path(config.expand(config.model.reference or config.model.policy))
    tokenizer = load_tokenizer(policy_path)
    actor_cfg = engine_config(config, world, config.learner.lr)
    # ZeRO-3: every model is partitioned as it loads, and no rank holds a whole one (`partitioned_load`)
    with partitioned_load(actor_cfg, config.ppo.minibatch_size):
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    if config.model.lora is not None:
        policy = add_adapters(policy, config.model.lora, seed=config.seed)
    actor = create_engine(policy, actor_cfg, train_batch_size=config.ppo.minibatch_size)
    critic = None
    if config.ppo.advantage_estimator == "gae":
        critic_cfg = engine_config(config, world, config.learner.critic_lr or config.learner.lr)
        with partitioned_load(critic_cfg, config.ppo.minibatch_size):
            value_model = ValueModel.from_pretrained(policy_path, dtype=dtype)
        critic = create_engine(value_model, critic_cfg, train_batch_size=config.ppo.minibatch_size)
    if config.model.lora is not None:  # the base model: the policy with its adapters off
        reference = AdaptersDisabled(actor)
    else:
        with partitioned_load(actor_cfg, config.ppo.minibatch_size):
            reference_model = AutoModelForCausalLM.from_pretrained(reference_path, dtype=dtype)
        reference = create_reference_engine(reference_model, actor_cfg)
    kl = config.ppo.kl
    kl_controller = (AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive
                     else FixedKLController(kl.coef))
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    return Learner(config, rank, world, DistributedReducer(), policy_path, tokenizer, actor, critic, reference,
                   kl_controller, generator, threads)


def resume(run_dir: Path, learner: Learner, driver: RolloutDriver | None) -> tuple[RunState, dict]:
    """The run state to continue from, and the policy's full weights (a collective under ZeRO-3).

    The same command again (or a restart by Ray Train after a lost worker) continues from the last
    complete checkpoint; the iterations after it are run again, exactly as they first were.
    """
    state = RunState(kl_controller=learner.kl_controller.state_dict())
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        state = load_checkpoint(latest, learner.actor, learner.critic, learner.generator, learner.rank)
        learner.kl_controller.load_state_dict(state.kl_controller)
    weights = policy_weights(learner)
    if driver:
        driver.start(state, latest, weights)
    return state, weights


def policy_weights(learner: Learner) -> dict | None:
    """The policy's trained weights on rank 0 (a collective under ZeRO-3): the full state dict, or with LoRA
    only the adapters (PEFT names; the base weights never change)."""
    only = is_adapter_parameter if learner.config.model.lora is not None else None
    return gather_full_state_dict(learner.actor, dtype=torch.float32, only=only)


def train_on(learner: Learner, episodes: list, policy_version: int, times: dict) -> tuple[dict, int, int]:
    """Experience from this rank's shard of the episodes, the PPO update, the KL controller's step.

    Returns the metrics, the staleness of the episodes (policy versions behind the learner's: overlap,
    or a chunk re-sent after new weights) and the number of tokens trained on over all ranks and epochs.
    """
    config = learner.config
    per_rank = len(episodes) // learner.world
    shard = episodes[learner.rank * per_rank:(learner.rank + 1) * per_rank]
    staleness = policy_version - min(e.policy_version for e in episodes)
    temperature, max_tokens = config.rollout.sampling.temperature, config.learner.micro_batch_tokens
    kl_coef = learner.kl_controller.value
    with timed(times, "perf/experience_s"):
        experience, metrics = make_experience(shard, learner.actor, learner.critic, learner.reference, config.ppo,
                                              kl_coef, temperature, learner.tokenizer.pad_token_id, learner.reducer,
                                              max_tokens, proximal=staleness > 0,
                                              max_new_tokens=config.rollout.max_new_tokens)
    with timed(times, "perf/update_s"):
        metrics.update(ppo_update(learner.actor, learner.critic, experience, config.ppo, kl_coef, temperature,
                                  learner.generator, learner.reducer, max_tokens, config.rollout.max_new_tokens))
    if "objective/kl" in metrics:  # else the coefficient is 0 and stays so (the reference pass was skipped)
        learner.kl_controller.update(metrics["objective/kl"], n_steps=len(episodes))
    tokens = int(learner.reducer.sum(experience.batch.attention_mask.sum())) * config.ppo.epochs
    return metrics, staleness, tokens


def evaluates(config: RunConfig, iteration: int) -> bool:
    """Whether the policy after `iteration` is evaluated: every `train.eval_every`-th, and the last."""
    every = config.train.eval_every
    return bool(every) and (iteration % every == 0 or iteration == config.train.iterations)


def evaluate(learner: Learner, driver: RolloutDriver | None, iteration: int) -> dict:
    """`eval/*` of the current policy on the held-out prompts (every rank takes part: the KL's reference pass
    is a collective under ZeRO-3): the mean reward and each component's, the response length, and the KL to
    the reference over the episodes that split evenly over the ranks. {} once the run is stopping."""
    from rlhf_ray.learner.ppo import sequence_kl

    episodes = broadcast_object(driver.sample_held_out(iteration) if driver else None)
    if isinstance(episodes, StopMarker):
        return {}
    config = learner.config
    per_rank = len(episodes) // learner.world
    shard = episodes[learner.rank * per_rank:(learner.rank + 1) * per_rank]
    stats = {"eval/reward_mean": float(np.mean([e.reward for e in episodes])),
             "eval/response_len": float(np.mean([len(e.response_ids) for e in episodes])),
             "eval/eos_frac": float(np.mean([e.eos for e in episodes])),
             **{f"eval/{name}": value for name, value in reward_component_means(episodes).items()}}
    if per_rank:
        kl = sequence_kl(shard, learner.reference, config.rollout.sampling.temperature, learner.tokenizer.pad_token_id,
                         learner.reducer, config.learner.micro_batch_tokens)
        stats["eval/kl"] = learner.reducer.mean(kl.sum(), len(shard))
    return stats


def publish_policy(learner: Learner, driver: RolloutDriver | None, state: RunState,
                   times: dict) -> tuple[RunState, dict]:
    """The next policy version: all ranks gather the full weights (a collective under ZeRO-3), and rank 0
    sends them to the rollout workers. Returns the new run state and the weights."""
    with timed(times, "perf/sync_s"):
        weights = policy_weights(learner)
        state = RunState(iteration=state.iteration + 1, policy_version=state.policy_version + 1,
                         kl_controller=learner.kl_controller.state_dict())
        if driver:
            driver.send_weights(weights, state.policy_version)
    return state, weights


def save_checkpoint(run_dir: Path, learner: Learner, driver: RolloutDriver | None, state: RunState,
                    weights: dict) -> None:
    """Every rank writes its engines' part; then rank 0 the policy folder and, last, the run state that
    marks the checkpoint complete (`rlhf_ray.checkpoint`)."""
    path = checkpoint_dir(run_dir, state.iteration)
    save_engines(path, learner.actor, learner.critic, learner.generator, learner.rank)
    barrier()
    if driver:
        driver.export_policy(weights, path / "policy")
        write_run_state(path, state)
