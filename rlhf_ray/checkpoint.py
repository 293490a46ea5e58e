"""Checkpoints of a PPO run: everything needed to continue exactly where the run stopped.

    runs/<name>/checkpoints/iter_000020/
        actor/, critic/        DeepSpeed engine states (model, optimizer; sharded under ZeRO), every rank
        rng_rank{R}.pt         each learner rank's minibatch-shuffling generator
        policy/                the policy as a Hugging Face folder with its tokenizer
        run_state.json         iteration, policy version, KL controller — written last

`run_state.json` is written after every rank has finished its part (a barrier), so a checkpoint
without it is incomplete (the run died while writing) and is never loaded. Rollout randomness needs
no state: each episode's seed derives from (run seed, iteration, index), and the iteration's prompts
from the iteration alone (`learner.driver.iteration_prompts`).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RUN_STATE = "run_state.json"
_NAME = re.compile(r"iter_(\d{6})$")


@dataclass
class RunState:
    iteration: int = 0  # iterations completed
    policy_version: int = 0
    kl_controller: dict = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{iteration:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of the highest iteration, or None."""
    root = Path(run_dir) / "checkpoints"
    complete = [p for p in root.glob("iter_*") if _NAME.search(p.name) and (p / RUN_STATE).is_file()]
    return max(complete, key=lambda p: int(_NAME.search(p.name).group(1)), default=None)


def save_engines(path: Path, actor, critic, generator: torch.Generator, rank: int) -> None:
    """This rank's part of a checkpoint (a collective: every rank calls it). Frozen parameters (the base
    model under LoRA adapters) are left out: they are the policy's start, which a resume loads anyway."""
    for name, engine in (("actor", actor), ("critic", critic)):
        if engine is not None:
            engine.save_checkpoint(str(path / name), tag="state", exclude_frozen_parameters=True)
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")


def write_run_state(path: Path, state: RunState) -> None:
    """Marks the checkpoint complete: call on rank 0 after every rank's `save_engines` (barrier)."""
    tmp = path / (RUN_STATE + ".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.rename(path / RUN_STATE)


def load_checkpoint(path: Path, actor, critic, generator: torch.Generator, rank: int) -> RunState:
    """Restore the engines and this rank's RNG from `path`; returns the run state."""
    for name, engine in (("actor", actor), ("critic", critic)):
        if engine is not None:
            frozen = any(not p.requires_grad for p in engine.module.parameters())  # not in the checkpoint
            loaded, _ = engine.load_checkpoint(str(path / name), tag="state", load_module_strict=not frozen)
            if loaded is None:
                raise RuntimeError(f"checkpoint {path / name} could not be loaded")
    rng = torch.load(path / f"rng_rank{rank}.pt")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    saved = json.loads((path / RUN_STATE).read_text())
    saved.pop("data_position", None)  # written by older versions, never read: the iteration fixes the prompts
    return RunState(**saved)


def prune_incomplete(run_dir: Path, keep_after: int) -> None:
    """Remove checkpoints of iterations after `keep_after` (left by a run that died while saving)."""
    for path in (Path(run_dir) / "checkpoints").glob("iter_*"):
        match = _NAME.search(path.name)
        if match and int(match.group(1)) > keep_after:
            shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics of iterations 1..`iteration`: later ones are run again after a resume."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.rename(path)
