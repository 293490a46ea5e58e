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

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController, informative_groups
from rlhf_ray.checkpoint import (
    RunState, checkpoint_dir, latest_checkpoint, load_checkpoint, prune_incomplete, save_engines, truncate_metrics,
    write_run_state,
)
from rlhf_ray.config import RunConfig
from rlhf_ray.errors import RunStopped, one_line
from rlhf_ray.learner.distributed import (
    DistributedReducer, barrier, broadcast_object, get_rank, get_world_size, use_worker_cpus,
)
from rlhf_ray.learner.engine import (
    AdaptersDisabled, EngineConfig, create_engine, create_reference_engine, gather_full_state_dict,
    learner_engine_config,
)
from rlhf_ray.learner.ppo import make_experience, ppo_update
from rlhf_ray.models import load_tokenizer, resolve_model_path
from rlhf_ray.models.folders import save_hf_folder
from rlhf_ray.models.loading import DTYPES
from rlhf_ray.models.lora import (
    adapter_payload, add_adapters, is_adapter_parameter, merged_state_dict, save_adapter_folder,
)
from rlhf_ray.models.value import ValueModel
from rlhf_ray.rollout.elastic import desired_workers
from rlhf_ray.rollout.run_sampler import held_out_prompt_texts
from rlhf_ray.sampling import episode_seed

CONTROL_TIMEOUT_S = 60.0  # the run's control actor lives on the driver's node and answers at once
HELD_OUT_SEEDS = 2**32  # the "iteration" of the held-out episodes' seeds: no training iteration's
EVAL_SAMPLES = "eval_samples.jsonl"  # train.eval_every: each held-out answer, with its iteration


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
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
    if config.model.lora is not None:
        policy = add_adapters(policy, config.model.lora, seed=config.seed)
    actor = create_engine(policy, engine_config(config, world, config.learner.lr),
                          train_batch_size=config.ppo.minibatch_size)
    critic = None
    if config.ppo.advantage_estimator == "gae":
        critic = create_engine(ValueModel.from_pretrained(policy_path, dtype=dtype),
                               engine_config(config, world, config.learner.critic_lr or config.learner.lr),
                               train_batch_size=config.ppo.minibatch_size)
    if config.model.lora is not None:  # the base model: the policy with its adapters off
        reference = AdaptersDisabled(actor)
    else:
        reference = create_reference_engine(AutoModelForCausalLM.from_pretrained(reference_path, dtype=dtype),
                                            engine_config(config, world, config.learner.lr))
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


class StopMarker:
    """Sent to every rank in place of the episodes: the run ends here, and nothing is retried."""


class RolloutDriver:
    """Rank 0's side of the run: it feeds the rollout pool, writes the run's files, and keeps why the run stops.

    A `RunStopped` from the pool or the driver's actors (the user's reward or dataset, workers that
    cannot start, a wait that ran out) is kept in `stop`, not raised: the other ranks learn of it at the
    next broadcast, every rank leaves the loop normally, and `finish` reports it.
    """

    def __init__(self, config: RunConfig, pool, control, run_dir: Path, learner: Learner):
        from rlhf_ray.rollout.run_sampler import prompt_texts

        self.config, self.pool, self.control, self.run_dir = config, pool, control, run_dir
        self.learner = learner
        self.tokenizer = learner.tokenizer
        self.stop: RunStopped | None = None
        self.writer: MetricsWriter | None = None
        self.next_rollout = None  # rollout.overlap: the next iteration's episodes, on their way
        self.chunks: list = []  # the last rollout's `RolloutChunk`s, for its timing
        self.sampling: dict = {}  # ppo.dynamic_sampling: the last rollout's rounds
        self.prompt_ids: list[list[int]] | None = None
        self.held_out_ids: list[list[int]] | None = None  # train.eval_every: read at the first evaluation
        with self.stopping():  # a dataset that breaks here (the driver's preflight read it whole)
            self.prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                               for t in prompt_texts(config, self.tokenizer)]
        self.export_model = AutoModelForCausalLM.from_pretrained(learner.policy_path, dtype=torch.float32)
        self.lora = config.model.lora
        # LoRA: the frozen base weights, onto which the exported policy merges the adapters
        self.base_weights = ({n: t.clone() for n, t in self.export_model.state_dict().items()}
                             if self.lora is not None else None)
        self.base_model = str(learner.policy_path)

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """A `RunStopped` raised inside becomes the reason the run stops, instead of propagating."""
        try:
            yield
        except RunStopped as err:
            self.stop = err

    def start(self, state: RunState, latest: Path | None, weights: dict) -> None:
        """The run's files as of `state` (later checkpoints and metrics go: those iterations run again), the
        `learner_start` event, and after a resume the checkpoint's policy on the rollout workers."""
        prune_incomplete(self.run_dir, keep_after=state.iteration)
        # from iteration 0 everything runs again, the start policy's evaluation (row 0) too
        for name in ("metrics.jsonl", EVAL_SAMPLES):
            truncate_metrics(self.run_dir / name, state.iteration if state.iteration else -1)
        self.writer = MetricsWriter(self.run_dir)
        log_event(self.run_dir, "learner_start", iteration=state.iteration,
                  resumed_from=str(latest) if latest else None, torch_threads=self.learner.torch_threads,
                  load_s=self.learner.load_s)
        if latest is not None:
            print(f"resuming from {latest} (iteration {state.iteration}, policy version {state.policy_version})")
            self.send_weights(weights, state.policy_version)

    def sample_held_out(self, iteration: int):
        """The current policy's episodes for the held-out prompts (the same seeds at every evaluation), or a
        `StopMarker` once the run stops. Sent after the latest weights, so the workers answer with those.
        Every answer goes to `eval_samples.jsonl` with the iteration, to read how the answers change."""
        if self.stop is None:
            with self.stopping():
                if self.held_out_ids is None:
                    self.held_out_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                                         for t in held_out_prompt_texts(self.config, self.tokenizer)]
                seeds = [episode_seed(self.config.seed, HELD_OUT_SEEDS, j) for j in range(len(self.held_out_ids))]
                episodes = self.pool.submit(self.held_out_ids, seeds).result()  # bounded by rollout.timeout_s
                with (self.run_dir / EVAL_SAMPLES).open("a") as f:
                    f.writelines(json.dumps({"iteration": iteration, "prompt": e.prompt, "response": e.response,
                                             "reward": e.reward, "eos": e.eos}) + "\n" for e in episodes)
                return episodes
        return StopMarker()

    def collect(self, iteration: int):
        """The iteration's episodes, or a `StopMarker` once the run stops.

        Under `rollout.overlap` they were sent out while the learner trained on the last iteration, and
        the next iteration's are sent out now, generated with the current weights while the learner trains.
        """
        self.chunks = []
        if self.stop is None:
            with self.stopping():
                if self.next_rollout is None:
                    self.next_rollout = self.submit(iteration)
                rollout, self.next_rollout = self.next_rollout, None
                episodes, self.chunks = rollout.result(), rollout.chunks  # bounded by rollout.timeout_s
                if self.config.ppo.dynamic_sampling:
                    episodes = self.keep_informative_groups(iteration, episodes)
                if self.config.rollout.overlap and iteration + 1 < self.config.train.iterations:
                    self.next_rollout = self.submit(iteration + 1)
                self.control.report_workers.remote(len(self.pool))
                return episodes
        return StopMarker()

    def submit(self, iteration: int, round: int = 0):
        """Send the iteration's prompts out (of sampling `round`), once the pool is resized to what the run
        wants now."""
        scale_pool(self.pool, self.control, self.config)
        return self.pool.submit(*iteration_prompts(self.config, self.prompt_ids, iteration, round))

    def keep_informative_groups(self, iteration: int, episodes: list) -> list:
        """DAPO's dynamic sampling: the batch's groups whose rewards differ, topped up from further rounds of
        prompts (at most `ppo.max_sampling_rounds` rollouts in all); a batch still short is filled with the
        dropped groups, whose advantages are 0. The rounds and the first round's informative share go to
        the iteration's metrics."""
        ppo, needed = self.config.ppo, self.config.rollout.batch_size
        informative, dropped = split_informative_groups(episodes, ppo.group_size)
        first_share = len(informative) / needed
        rounds = 1
        while len(informative) < needed and rounds < ppo.max_sampling_rounds:
            rollout = self.submit(iteration, rounds)
            more, less = split_informative_groups(rollout.result(), ppo.group_size)  # bounded by rollout.timeout_s
            self.chunks += rollout.chunks
            informative, dropped, rounds = informative + more, dropped + less, rounds + 1
        self.sampling = {"rollout/sampling_rounds": rounds, "rollout/informative_frac": first_share,
                         "rollout/uninformative_kept": max(0, needed - len(informative))}
        groups = informative[:needed] + dropped[:max(0, needed - len(informative))]
        return [episode for group in groups for episode in group]

    def send_weights(self, weights: dict, version: int) -> None:
        """The policy to every live rollout worker (unless the run is stopping), or with LoRA only its adapters,
        which the workers merge into the base weights they keep; a failure stops the run at the next
        broadcast, and the checkpoint of this iteration is still written."""
        if self.stop is None:
            with self.stopping():
                if self.lora is not None:
                    weights = adapter_payload(weights, self.lora.alpha / self.lora.r)
                self.pool.set_weights(weights, version)

    def write_metrics(self, metrics: dict, state: RunState, episodes: list, staleness: int, learner_tokens: int,
                      times: dict, started: float) -> None:
        """The iteration's line of metrics.jsonl (and TensorBoard): the update's statistics, then the run's."""
        rollout_s, update_s = times["perf/rollout_s"], times["perf/update_s"]
        response_tokens = int(sum(len(e.response_ids) for e in episodes))
        metrics.update({
            "iteration": state.iteration, "policy_version": state.policy_version, "pool/workers": len(self.pool),
            "rollout/staleness": staleness,
            "perf/rollout_s": rollout_s, **reward_component_means(episodes), **rollout_timing(self.chunks),
            **self.sampling,
            "perf/experience_s": times["perf/experience_s"], "perf/update_s": update_s,
            "perf/sync_s": times["perf/sync_s"], "perf/iteration_s": time.perf_counter() - started,
            **({"perf/eval_s": times["perf/eval_s"]} if "perf/eval_s" in times else {}),
            "perf/rollout_tokens_per_s": response_tokens / max(rollout_s, 1e-9),
            "perf/learner_tokens_per_s": learner_tokens / max(update_s, 1e-9),
        })
        self.writer.write(metrics)

    def export_policy(self, weights: dict, path: Path) -> None:
        """The policy as a plain Hugging Face folder with its tokenizer, written whole or not at all; with LoRA
        the adapters merged into the base weights, and the PEFT adapter folder beside it (`<path>_adapter`)."""
        if self.lora is not None:
            save_adapter_folder(path.with_name(path.name + "_adapter"), weights, self.lora, self.base_model)
            weights = merged_state_dict(self.export_model, self.base_weights,
                                        adapter_payload(weights, self.lora.alpha / self.lora.r))
        self.export_model.load_state_dict(weights)
        save_hf_folder(path, self.export_model, self.tokenizer)

    def finish(self, state: RunState, weights: dict) -> None:
        """The final `policy/` folder, or (the run stopped) why, to `error.log`, `events.jsonl` and the driver."""
        if self.stop is not None:
            report_stop(self.stop, self.run_dir, self.control, state.iteration)
        else:
            self.export_policy(weights, self.run_dir / "policy")


@contextlib.contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """`times[name]`: the seconds the block took."""
    started = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - started


def iteration_prompts(config: RunConfig, prompt_ids: list[list[int]], iteration: int,
                      round: int = 0) -> tuple[list, list[int]]:
    """The iteration's prompts (each `group_size` times in a row) and one seed per episode.

    Prompts are taken in order and cycled: iteration k starts at position k * batch_size, so a resumed
    run needs only the iteration to pick up the same prompts. Dynamic sampling's further `round`s r take
    the prompts r batches on, with seeds of their own.
    """
    size, group = config.rollout.batch_size, config.ppo.group_size
    start = (iteration + round) * size
    indices = [(start + i) % len(prompt_ids) for i in range(size) for _ in range(group)]
    seeds = [episode_seed(config.seed, iteration, round * size * group + j) for j in range(size * group)]
    return [prompt_ids[i] for i in indices], seeds


def split_informative_groups(episodes: list, group_size: int) -> tuple[list[list], list[list]]:
    """The batch's groups (`group_size` consecutive episodes of one prompt) whose rewards differ, and the rest."""
    groups = [episodes[i:i + group_size] for i in range(0, len(episodes), group_size)]
    keep = informative_groups(torch.tensor([e.reward for e in episodes], dtype=torch.float64), group_size).tolist()
    return [g for g, k in zip(groups, keep) if k], [g for g, k in zip(groups, keep) if not k]


def scale_pool(pool, control, config: RunConfig) -> None:
    """Grow or shrink the rollout pool towards what the run wants now (`rollout/elastic.py`)."""
    pool.wait_ready(0)
    target = ray.get(control.rollout_target.remote(), timeout=CONTROL_TIMEOUT_S)
    workers = config.rollout.workers
    pool.resize(desired_workers(pool.size, workers.min, workers.max, target, ray.available_resources(), pool.demand))


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
