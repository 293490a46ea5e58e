"""Rank 0's side of a PPO run: the rollout pool, the run's files, and why the run stops.

`RolloutDriver` feeds the pool the iteration's prompts (DAPO's further rounds too), collects every episode
once, samples the held-out prompts, sends new weights (or LoRA adapters) to the workers, and writes
metrics.jsonl, TensorBoard events, eval_samples.jsonl, events.jsonl and the exported policy. The learner
loop (`learner/train_loop.py`) calls it on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms import informative_groups
from rlhf_ray.checkpoint import RunState, prune_incomplete, truncate_metrics
from rlhf_ray.config import RunConfig
from rlhf_ray.errors import RunStopped, one_line
from rlhf_ray.models.folders import save_hf_folder
from rlhf_ray.models.lora import adapter_payload, merged_state_dict, save_adapter_folder
from rlhf_ray.rollout.elastic import desired_workers
from rlhf_ray.rollout.run_sampler import held_out_prompt_texts
from rlhf_ray.sampling import episode_seed

if TYPE_CHECKING:
    from rlhf_ray.learner.train_loop import Learner

CONTROL_TIMEOUT_S = 60.0  # the run's control actor lives on the driver's node and answers at once
HELD_OUT_SEEDS = 2**32  # the "iteration" of the held-out episodes' seeds: no training iteration's
EVAL_SAMPLES = "eval_samples.jsonl"  # train.eval_every: each held-out answer, with its iteration


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
                rollout = self.config.rollout
                if rollout.sync == "collective":
                    self.pool.set_weights_collective(weights, version, int(rollout.sync_bucket_mb * 2**20))
                else:
                    self.pool.set_weights(weights, version)

    def write_metrics(self, metrics: dict, state: RunState, episodes: list, staleness: int, learner_tokens: int,
                      times: dict, started: float) -> None:
        """The iteration's line of metrics.jsonl (and TensorBoard): the update's statistics, then the run's."""
        rollout_s, update_s = times["perf/rollout_s"], times["perf/update_s"]
        response_tokens = int(sum(len(e.response_ids) for e in episodes))
        metrics.update({
            "iteration": state.iteration, "policy_version": state.policy_version, "pool/workers": len(self.pool),
            # every episode of the batch came back, those of chunks re-sent after a worker was lost too
            "rollout/episodes": len(episodes), "pool/requeued_chunks": self.pool.requeued_chunks,
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
    """metrics.jsonl and TensorBoard events (`tensorboard/`) in `run_dir`, rank 0 only; each line's `step_key`
    is its TensorBoard step."""

    def __init__(self, run_dir: Path, step_key: str = "iteration"):
        from tensorboardX import SummaryWriter

        self.path, self.step_key = Path(run_dir) / "metrics.jsonl", step_key
        self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and name != self.step_key:
                self.tensorboard.add_scalar(name, value, metrics[self.step_key])
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()
