"""One round of `rlhf-ray loop`: from the feedback the served version collected to the next served version.

    feedback  export every feedback record and label so far (as `rlhf-ray feedback export`) into the
              version folder: the round's training set, fixed once written
    train     the reward model H and the satisfaction model S on it (the config's stages), then PPO (or the
              critic-free method of `ppo.advantage_estimator`) from the served version, with the KL to it in
              the loss; or, when the config has a `dpo:` section, DPO from the served version on the
              round's preference pairs (the served version its reference), with no reward model or sampling
    eval      the candidate against the served version on held-out prompts (`rlhf-ray eval`'s report)
    human     only with `loop.gate.human`: a blind study of the eval's answers on the pages (loop/study.py),
              waited for
    gate      deploy only if the judge's win rate, the KL and (when configured) the people's win rate pass
              `loop.gate`
    deploy    the zero-downtime swap (serve/deploy.py), and served.json

Each step is recorded in version.json when it has finished; a round started again (after a crash) goes on
from the first step not recorded, and the stages it reruns skip what they completed (`rlhf-ray pipeline`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlhf_ray.config.schema import RunConfig
from rlhf_ray.loop.study import create_study, human_summary, study_name, wait_for_study
from rlhf_ray.loop.versions import read_record, version_id, versions_dir, write_record

STEPS = ("feedback", "train", "eval", "human", "gate", "deploy")  # "human" with loop.gate.human only


def feedback_counts(db: str | Path) -> dict:
    """How many feedback records and labels the database holds, and their largest ids."""
    from rlhf_ray.serve.feedback_store import FeedbackStore

    store = FeedbackStore(db, readonly=True)
    try:
        return store.counts()
    finally:
        store.close()


def round_config(config: RunConfig, folder: Path, parent_policy: str) -> RunConfig:
    """The run config of a round: {run} is the version folder, the policy and the KL reference the served
    version, H, S and DPO on the round's exported feedback (DPO from the served version)."""
    from rlhf_ray.pipeline.stages import feedback_dataset

    update: dict = {"output_dir": str(folder.parent), "name": folder.name, "sft": None, "loop": None,
                    "model": config.model.model_copy(update={"policy": parent_policy, "reference": None})}
    for stage, name in (("reward_model", "preferences.jsonl"), ("satisfaction_model", "ratings.jsonl"),
                        ("dpo", "preferences.jsonl")):
        section = getattr(config, stage)
        if section is not None:
            update[stage] = section.model_copy(update={
                "data": feedback_dataset(config, folder / "feedback" / name), "feedback_db": None,
                **({"base": parent_policy} if stage == "dpo" else {})})
    return config.model_copy(update=update)


def train_stages(config: RunConfig) -> tuple[str, ...]:
    """The pipeline stages a round runs: H and S where configured, then DPO if configured, else PPO."""
    stages = tuple(s for s in ("reward_model", "satisfaction_model") if getattr(config, s) is not None)
    return (*stages, "dpo" if config.dpo is not None else "ppo")


def eval_args(folder: Path, config: RunConfig, parent_policy: str) -> argparse.Namespace:
    loop = config.loop
    return argparse.Namespace(target=str(folder), config=None, overrides=[], prompts=None,
                              num_prompts=loop.eval_prompts, reference=parent_policy, judge=loop.judge,
                              device="cpu", max_new_tokens=None, seed=None, out=str(folder / "eval"), samples=8,
                              study=None)


def gate(evaluation: dict, config: RunConfig, human: dict | None = None) -> tuple[str, str]:
    """("deploy" | "rejected", why) for the candidate's evaluation against the served version (and the
    blind study's results, with loop.gate.human)."""
    rules = config.loop.gate
    failed, passed = [], [f"win rate {evaluation['win_rate']:.3f} >= {rules.min_win_rate}"]
    if evaluation["win_rate"] < rules.min_win_rate:
        failed.append(f"win rate {evaluation['win_rate']:.3f} < {rules.min_win_rate}")
    if rules.max_kl is not None:
        if evaluation["kl"] > rules.max_kl:
            failed.append(f"KL {evaluation['kl']:.3f} > {rules.max_kl}")
        passed.append(f"KL {evaluation['kl']:.3f} <= {rules.max_kl}")
    if rules.human is not None:
        if human is None:
            failed.append("no blind study results")
        elif not human["complete"]:
            failed.append(f"the blind study has {human['labels']} of {human['items'] * rules.human.labels_per_item} "
                          f"judgements after {rules.human.wait_minutes:g} min")
        elif human["win_rate"]["rate"] < rules.human.min_win_rate:
            failed.append(f"people's win rate {human['win_rate']['rate']:.3f} < {rules.human.min_win_rate}")
        else:
            passed.append(f"people's win rate {human['win_rate']['rate']:.3f} >= {rules.human.min_win_rate}")
    if failed:
        return "rejected", "; ".join(failed)
    return "deploy", ", ".join(passed)


def begin_round(run_dir: Path, number: int, parent: dict) -> Path:
    """The version folder of round `number` (its record written first: the version list has no gap)."""
    folder = versions_dir(run_dir) / version_id(number)
    if not (folder / "version.json").is_file():
        write_record(folder, {"id": version_id(number), "number": number, "parent": parent["id"],
                              "parent_policy": parent["policy"], "policy": str(folder / "policy"),
                              "created": time.time(), "steps": []})
    return folder


def run_round(config: RunConfig, folder: Path, deploy_fn, address: str | None = None, log=print) -> dict:
    """Run the steps of the round in `folder` not yet recorded; returns its final record."""
    from rlhf_ray.evaluation.cli import run_eval
    from rlhf_ray.pipeline.stages import run_pipeline
    from rlhf_ray.serve.feedback_export import export_feedback

    record = read_record(folder)

    def done(step: str, **fields) -> None:
        record.update(fields)
        record["steps"] = [*record["steps"], step]
        write_record(folder, record)
        log(f"[loop] {record['id']}: {step} done")

    db = config.expand(config.loop.feedback_db)
    if "feedback" not in record["steps"]:
        counts = feedback_counts(db)  # read before the export: whatever it holds, the export holds too
        summary = export_feedback(db, folder / "feedback")
        done("feedback", feedback={**counts, "pairs": summary.pairs, "rated": summary.rated,
                                   "left_out": summary.left_out().removeprefix("; left out: ")})
    if "train" not in record["steps"]:
        stages = train_stages(config)
        run_pipeline(round_config(config, folder, record["parent_policy"]), address=address, stages=stages)
        done("train", **({"policy": str(folder / "dpo")} if "dpo" in stages else {}))
    if "eval" not in record["steps"]:
        _, result, _ = run_eval(eval_args(folder, config, record["parent_policy"]))
        judged = [(s.policy_judge, s.reference_judge) for s in result.samples]
        done("eval", eval={"win_rate": result.win_rate, "kl": result.kl, "judge": result.judge,
                           "score": sum(p for p, _ in judged) / len(judged),  # the judge's mean, candidate
                           "served_score": sum(r for _, r in judged) / len(judged),  # and served version
                           "reward": result.policy["reward"], "served_reward": result.reference["reward"]})
    human = config.loop.gate.human
    if human is not None and "human" not in record["steps"]:
        name = study_name(config.name, record["id"])
        create_study(db, name, folder / "eval" / "eval.json", human, config.seed, record["policy"],
                     record["parent_policy"])
        results = wait_for_study(db, name, human, config.loop.poll_s, log)
        done("human", human=human_summary(results))
    if "gate" not in record["steps"]:
        decision, why = gate(record["eval"], config, record.get("human"))
        done("gate", decision=decision, why=why)
        log(f"[loop] {record['id']}: {decision} ({why})")
    if "deploy" not in record["steps"]:
        if record["decision"] == "deploy":
            deploy_fn(record)
        done("deploy", finished=time.time())
    return record
