"""What the SFT and reward-model stages share: the data split, batches per rank, metrics, saving, launch."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import ray
import torch

from rlhf_ray.config import RunConfig, StageConfig
from rlhf_ray.learner.distributed import get_rank, get_world_size, use_worker_cpus
from rlhf_ray.learner.driver import MetricsWriter
from rlhf_ray.learner.engine import EngineConfig, gather_full_state_dict, learner_engine_config
from rlhf_ray.learner.launch import describe_failure, learner_group
from rlhf_ray.models.folders import save_hf_folder
from rlhf_ray.models.loading import load_tokenizer, resolve_model_path
from rlhf_ray.models.lora import add_adapters, merge_adapters

SUMMARY = "summary.json"  # written last into a stage's folder before it is renamed into place


class StageError(RuntimeError):
    """A stage that cannot run as configured, or whose learner failed; the message says which and why."""


def stage_complete(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file()


def start_stage(loop_config: dict, name: str) -> tuple[RunConfig, StageConfig, Path, Path, object]:
    """What a stage's learner rank starts from: the run configuration, the stage's own (`name`), its output
    folder, the base model's folder and its tokenizer; the seed and the rank's CPU threads are set."""
    config = RunConfig.model_validate(loop_config["config"])
    stage = getattr(config, name)
    torch.manual_seed(config.seed)
    use_worker_cpus(config.learner.cpus_per_worker, config.learner.use_gpu, config.learner.torch_threads,
                    node_is_idle=True)  # a stage runs alone
    base = resolve_model_path(config.expand(stage.base))
    return config, stage, Path(loop_config["out"]), base, load_tokenizer(base)


def with_lora(model: torch.nn.Module, config: RunConfig, trainable: tuple[str, ...] = ()) -> torch.nn.Module:
    """The stage's model in the run's LoRA adapters (`model.lora`), `trainable` modules trained in full; as is
    without LoRA."""
    return model if config.model.lora is None else add_adapters(model, config.model.lora, trainable, config.seed)


def trained_state_dict(engine, config: RunConfig, export: torch.nn.Module | None) -> dict | None:
    """The trained weights for `export` (rank 0; None elsewhere), adapters merged in; a collective."""
    state = gather_full_state_dict(engine, dtype=torch.float32)
    if state is None or config.model.lora is None:
        return state
    return merge_adapters(export, state, config.model.lora)


def split_records(records: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, then the first `eval_fraction` held out (at least one record
    when the fraction is positive and at least two records exist)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = held_out_count(len(records), eval_fraction)
    return [records[i] for i in order[held:]], [records[i] for i in order[:held]]


def held_out_count(n: int, eval_fraction: float) -> int:
    """How many of `n` records `split_records` holds out."""
    held = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        held = max(held, 1)
    return max(0, min(held, n - 1))


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shuffled indices of one epoch in full batches of `batch_size` (the remainder is dropped)."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def rank_slice(items: Sequence) -> list:
    """This rank's share of a global batch: every world_size-th item from its rank."""
    return list(items[get_rank()::get_world_size()])


def rank_batches(items: Sequence, batch_size: int) -> list[tuple[list, int]]:
    """This rank's share of `items` (`rank_slice`) in batches of at most `batch_size`, as (batch, real): only
    the first `real` items of a batch count. Every rank gets as many batches of the same sizes: a share one
    item short ends with a filler (the first item), because under ZeRO-3 every forward pass gathers the
    parameters from all ranks, and a rank with a pass fewer would leave the others waiting."""
    mine = rank_slice(items)
    longest = -(-len(items) // get_world_size())
    padded = mine + [items[0]] * (longest - len(mine))
    return [(padded[start:start + batch_size], max(0, min(batch_size, len(mine) - start)))
            for start in range(0, longest, batch_size)]


def stage_engine_config(stage: StageConfig, config: RunConfig) -> EngineConfig:
    world = get_world_size()
    if stage.batch_size % world:
        raise StageError(f"batch_size ({stage.batch_size}) must be a multiple of learner.num_workers ({world})")
    return learner_engine_config(config.learner, stage.lr, stage.batch_size // world, weight_decay=stage.weight_decay)


class StageWriter:
    """Rank 0's outputs of a stage, all inside `<out>.tmp/` until `finish` renames it to `<out>/`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        self.metrics = None
        if get_rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            self.metrics = MetricsWriter(self.tmp, step_key="step")

    def log(self, metrics: dict, show: bool = True) -> None:
        """Append to metrics.jsonl and TensorBoard (at its `step`); print it too when `show`."""
        if get_rank() == 0:
            self.metrics.write(metrics)
            if show:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                  flush=True)

    def finish(self, export_model, state_dict, tokenizer, summary: dict) -> None:
        """Save the model and tokenizer, write summary.json last, and rename the folder into place."""
        if get_rank() != 0:
            return
        self.metrics.close()
        export_model.load_state_dict(state_dict)
        save_hf_folder(self.out, export_model, tokenizer, {SUMMARY: json.dumps(summary, indent=2) + "\n"},
                       staging=self.tmp)


def held_out_figures(writer: StageWriter, heldout: Sequence, measure: Callable[[], dict], prefix: str):
    """`held_out(epoch, step)`: the held-out figures `measure()` returns, logged with each key under `prefix`;
    None (and nothing measured) when the stage holds nothing out."""
    def held_out(epoch: int, step: int) -> dict | None:
        if not heldout:
            return None
        result = measure()
        writer.log({"epoch": epoch, "step": step, **{f"{prefix}{key}": value for key, value in result.items()}})
        return result

    return held_out


def run_stage(loop: Callable[[dict], None], config: RunConfig, stage: str, out: Path) -> Path:
    """Run `loop` on `learner.num_workers` Ray Train workers (Ray must be up); returns `out`."""
    trainer = learner_group(loop, {"config": config.model_dump(mode="json"), "stage": stage, "out": str(out)},
                            config.learner, stage, Path(out).parent / "ray_train")
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise StageError(f"the {stage} stage failed: {describe_failure(err)}") from err
    if not stage_complete(out):
        raise StageError(f"the {stage} stage ended without writing {out / SUMMARY}")
    return out
