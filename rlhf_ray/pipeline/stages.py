"""`rlhf-ray pipeline CONFIG`: SFT -> reward model -> PPO, or SFT -> DPO, each stage's output the next one's input.

    {run}/sft/            the SFT policy (when the config has an `sft` section)
    {run}/reward_model/   the Bradley-Terry reward model (when it has a `reward_model` section)
    {run}/satisfaction_model/  the user-satisfaction model S on ratings and likes (a `satisfaction_model` section)
    {run}/dpo/            the DPO policy (when it has a `dpo` section)
    {run}/policy/ ...     the PPO run, as `rlhf-ray train` writes it

With a `dpo` section, PPO runs only when it starts from the DPO model (`model.policy: "{run}/dpo"`):
SFT -> DPO is a whole pipeline.

The config wires the stages together by path: `model.policy: "{run}/sft"` starts PPO from the SFT
model (and, with no `model.reference`, uses it as the frozen reference), and a reward component
`model: "{run}/reward_model"` scores with the trained reward model. A stage whose folder is complete
is skipped, so running the same command again resumes where the last one stopped (PPO resumes
from its last checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.config import STAGE_SECTIONS, RunConfig, dump_config
from rlhf_ray.pipeline.preflight import preflight
from rlhf_ray.stages.common import StageError, run_stage, stage_complete

STAGES = (*STAGE_SECTIONS, "ppo")  # sft, reward_model, satisfaction_model, dpo, then PPO


def ppo_complete(run_dir: Path, iterations: int) -> bool:
    """The PPO run wrote its final policy after its last iteration."""
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "policy" / "config.json").is_file() or not metrics.is_file():
        return False
    lines = metrics.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1])["iteration"] >= iterations


def check_wiring(config: RunConfig) -> None:
    """Fail before any stage runs when a path names a stage output that this pipeline will not make."""
    made = {f"{{run}}/{stage}": getattr(config, stage) is not None for stage in STAGES[:-1]}
    paths = [("model.policy", config.model.policy), ("model.reference", config.model.reference or "")]
    paths += [(f"reward.components.{name}.model", c.model or "") for name, c in (config.reward.components or {}).items()]
    paths += [(f"{stage}.base", getattr(config, stage).base) for stage in STAGE_SECTIONS[1:]
              if getattr(config, stage) is not None]
    for key, path in paths:
        for output, present in made.items():
            if path.rstrip("/") == output and not present and not Path(config.expand(output)).is_dir():
                stage = output.removeprefix("{run}/")
                raise StageError(f"{key} is {path!r}, but the config has no '{stage}' section to make it")


def feedback_dataset(config: RunConfig, path: str | Path):
    """An exported feedback file as a stage's data, its prompts formatted as the run formats the prompts the
    reward then scores (`data.prompt_dataset.chat_template`; a served chat's prompt, already rendered in the
    template, is kept as it is by `format_prompt`)."""
    from rlhf_ray.data.config import DatasetConfig

    prompts = config.data.prompt_dataset
    return DatasetConfig(path=str(path), chat_template=None if prompts is None else prompts.chat_template)


def export_stage_feedback(config: RunConfig, stage: str) -> RunConfig:
    """`config` with `<stage>.data` what it trains on, exported from `<stage>.feedback_db` into
    {run}/<stage>_feedback/ as `rlhf-ray feedback export` writes it: DPO's preference pairs (ties left out and
    counted) for DPO and the reward model, the satisfaction model's ratings and likes (the latest of each answer
    and person, and the labelling pages' ratings)."""
    from rlhf_ray.serve.feedback_export import export_feedback

    section = getattr(config, stage)
    db, out = Path(section.feedback_db), Path(config.run_dir) / f"{stage}_feedback"
    if not db.is_file():
        raise StageError(f"{stage}.feedback_db: {db} does not exist (the database of `rlhf-ray serve --feedback-db`)")
    try:
        summary = export_feedback(db, out)
    except Exception as err:  # not a feedback database, or a broken one
        raise StageError(f"{stage}.feedback_db: {db}: {err}") from err
    if stage in ("dpo", "reward_model"):
        path, count, what, of = summary.preferences, summary.pairs, "preference pairs", "pairs"
    else:
        path, count, what, of = summary.ratings, summary.rated, "rated answers", "ratings"
    found = f"{summary.feedback_records} feedback records and {summary.labels} labels"
    print(f"[pipeline] {stage}: {found} in {db} -> {count} {what} in {path}{summary.left_out(of)}")
    if count == 0:
        raise StageError(f"{stage}.feedback_db: {db} holds no {what} to train on ({found}{summary.left_out(of)})")
    # the stage's ranks read the exported file (a config names one source: the database is done with)
    updated = section.model_copy(update={"data": feedback_dataset(config, path), "feedback_db": None})
    return RunConfig.model_validate({**config.model_dump(), stage: updated.model_dump()})


def run_pipeline(config: RunConfig, address: str | None = None, progress: bool = True,
                 stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Run the configured stages in order; returns each stage's status: 'ran', 'skipped' or 'absent'.

    `stages` limits the run to some of them (e.g. only `reward_model` on newly exported feedback).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise StageError(f"unknown stage(s) {sorted(unknown)}; the stages are {', '.join(STAGES)}")
    from rlhf_ray.pipeline.train import start_ray, train
    from rlhf_ray.stages.dpo import dpo_loop
    from rlhf_ray.stages.reward_model import reward_model_loop
    from rlhf_ray.stages.satisfaction import satisfaction_loop
    from rlhf_ray.stages.sft import sft_loop

    config = config.with_absolute_paths()
    check_wiring(config)
    if "ppo" in stages and config.dpo is not None and config.model.policy.rstrip("/") != "{run}/dpo":
        print("[pipeline] ppo: not run (the config has a dpo stage, and model.policy is not \"{run}/dpo\")")
        stages = tuple(stage for stage in stages if stage != "ppo")
    for stage in ("reward_model", "satisfaction_model", "dpo"):
        section = getattr(config, stage)
        if stage in stages and section is not None and section.feedback_db \
                and not stage_complete(Path(config.run_dir) / stage):
            config = export_stage_feedback(config, stage)
    # every dataset, model and reward the chosen stages read, before Ray starts (a stage's output is
    # checked once that stage has made it: PPO's own preflight runs in `train`)
    preflight(config, stages=stages)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(dump_config(config))
    status = {}
    loops = {"sft": sft_loop, "reward_model": reward_model_loop, "satisfaction_model": satisfaction_loop,
             "dpo": dpo_loop}
    for stage, loop in loops.items():
        section = getattr(config, stage)
        out = run_dir / stage
        if stage not in stages:
            continue
        if section is None:
            status[stage] = "absent"
        elif stage_complete(out):
            status[stage] = "skipped"
            print(f"[pipeline] {stage}: {out} is complete, skipped")
        else:
            print(f"[pipeline] {stage}: training from {section.base} on {section.data.path}")
            start_ray(config, address)
            run_stage(loop, config, stage, out)
            summary = json.loads((out / "summary.json").read_text())
            print(f"[pipeline] {stage}: done, {_summary_line(summary)}")
            status[stage] = "ran"
    if "ppo" not in stages:
        return status
    if ppo_complete(run_dir, config.train.iterations):
        status["ppo"] = "skipped"
        print(f"[pipeline] ppo: {run_dir / 'policy'} is complete, skipped")
    else:
        print("[pipeline] ppo: training")
        train(config, address=address, progress=progress)
        status["ppo"] = "ran"
    return status


def _summary_line(summary: dict) -> str:
    keys = ("eval_loss_before", "eval_loss_after", "eval_accuracy_before", "eval_accuracy_after", "eval_margin_before",
            "eval_margin_after", "score_std", "eval_mse_before", "eval_mse_after", "eval_mse_of_mean")
    return ", ".join(f"{k} {summary[k]:.4g}" for k in keys if isinstance(summary.get(k), (int, float)))
