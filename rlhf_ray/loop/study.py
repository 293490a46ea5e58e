"""The human part of a round's gate (`loop.gate.human`): a blind study of the candidate (model a) against the
served version (model b) on the pages' /ui/eval, from the answers the round's eval already sampled.

The study is a queue of the served feedback database, named after the run and the version
(`loop-<run>-v0002`), created once: a round started again after a crash finds it and waits on, with the
deadline counted from its creation. Its judgements are not training data (FeedbackStore.counts leaves
them out) and each is on the candidate's and the served version's answer to the same prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_ray.config.loop import HumanGateConfig


def study_name(run_name: str, version: str) -> str:
    return f"loop-{run_name}-{version}"


def create_study(db: str | Path, name: str, eval_json: Path, human: HumanGateConfig, seed: int,
                 candidate: str, served: str) -> dict:
    """Queue the study (the first `human.prompts` samples of the round's eval.json); its queue summary. An
    existing study of that name (this round, started again) is kept as it is."""
    from rlhf_ray.evaluation.study import study_items
    from rlhf_ray.serve.db import FeedbackError
    from rlhf_ray.serve.feedback_store import FeedbackStore

    store = FeedbackStore(db)
    try:
        try:
            return store.queue(name)
        except FeedbackError:
            pass
        samples = json.loads(eval_json.read_text())["samples"][:human.prompts]
        items = study_items([s["prompt_text"] for s in samples], [s["policy_response"].strip() for s in samples],
                            [s["reference_response"].strip() for s in samples], seed=seed)
        spec = {"models": {"a": candidate, "b": served}, "prompts": str(eval_json), "seed": seed, "loop": True}
        return store.add_queue(name, "study", f"{len(items)} held-out prompts: the next version against the one "
                               "served now, blind", human.labels_per_item, spec, items)
    finally:
        store.close()


def read_results(db: str | Path, name: str) -> dict:
    """The study's results and creation time, read-only (the server is writing its judgements)."""
    from rlhf_ray.serve.feedback_store import FeedbackStore

    store = FeedbackStore(db, readonly=True)
    try:
        return {**store.study_results(name), "created": store.queue(name)["created"]}
    finally:
        store.close()


def wait_for_study(db: str | Path, name: str, human: HumanGateConfig, poll_s: float, log=print,
                   clock=time.time) -> dict:
    """Block until every item of the study has its judgements, or `human.wait_minutes` after its creation;
    its results then, with `timed_out`."""
    told = None
    while True:
        now = read_results(db, name)
        if now["complete"]:
            return {**now, "timed_out": False}
        needed = now["items"] * human.labels_per_item
        if clock() >= now["created"] + 60 * human.wait_minutes:
            return {**now, "timed_out": True}
        if now["labels"] != told:
            log(f"[loop] waiting for the blind study {name} at /ui/eval?queue={name}: "
                f"{now['labels']} of {needed} judgements")
            told = now["labels"]
        time.sleep(poll_s)


def human_summary(results: dict) -> dict:
    """What version.json keeps of a study: its name, counts, win rate with its interval, kappa per pair."""
    return {"study": results["study"], "items": results["items"], "labels": results["labels"],
            "complete": results["complete"], "timed_out": results["timed_out"], "win_rate": results["win_rate"],
            "agreement": results["agreement"]}
