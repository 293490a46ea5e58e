"""`rlhf-ray loop CONFIG`: serve the policy and, each round, train, evaluate, gate and deploy the next version
from the feedback it collected (loop/round.py), on the same Ray cluster as the server.

    users ──► served version ──► feedback.db ──(min_new_feedback or every_minutes)──► round k: export →
      ▲          (Ray Serve)          ▲        H, S → PPO (or DPO) from the served version → eval → gate
      │                               └── people's blind study (loop.gate.human) ◄──────────┘    │
      └──────────── zero-downtime swap ◄─────────────────────────────────── deploy (if it passes) ┘

A round that fails (a stage's error, a failed eval) is reported and leaves the served version as it was; the
loop then stops, since the same data would fail the same way. Killed and started again, the loop serves
the version of served.json and goes on with the round it was in.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_ray.config.schema import RunConfig
from rlhf_ray.loop.round import begin_round, feedback_counts, run_round
from rlhf_ray.loop.versions import (
    list_versions, mark_served, served, start_version, version_record, versions_dir, write_json,
)


class LoopError(RuntimeError):
    """A round that failed: the served version is unchanged."""


def serve_config(config: RunConfig, policy: str):
    from rlhf_ray.serve.config import ServeConfig

    fields = {"feedback_db": config.expand(config.loop.feedback_db), "model_name": config.name,
              **config.loop.serve, "policy": policy}
    return ServeConfig.model_validate(fields)


def start_serving(config: RunConfig, run_dir: Path) -> dict:
    """Serve the version of served.json (v0000, model.policy, the first time) on Ray Serve; its record."""
    from ray import serve

    start = start_version(run_dir, config.model.policy)
    current = served(run_dir)
    record = version_record(run_dir, current["id"]) if current else start
    path = versions_dir(run_dir) / "serve.json"
    if not path.is_file():  # the app's args stay those of the first start: later deploys are swaps
        write_json(path, serve_config(config, start["policy"]).model_dump(mode="json"))
    serve.start(http_options={"host": config.loop.host, "port": config.loop.port})
    deploy_version(run_dir, record, how="deploy" if current is None else None)
    return record


def deploy_version(run_dir: Path, record: dict, how: str | None = "deploy") -> None:
    """Serve `record`'s version with the loop's saved ServeConfig; `how` is logged in deploys.jsonl (None:
    a restart serving what served.json already says)."""
    from rlhf_ray.serve.config import PolicyUpdate, ServeConfig
    from rlhf_ray.serve.deploy import deploy

    server = ServeConfig.model_validate_json((versions_dir(run_dir) / "serve.json").read_text())
    deploy(server, PolicyUpdate(policy=record["policy"], policy_version=record["id"]))
    if how is not None:
        mark_served(run_dir, record, how)


def wait_for_feedback(config: RunConfig, since: dict, last_round: float, log=print) -> dict:
    """Block until loop.min_new_feedback new records and labels are in (or loop.every_minutes have passed
    with at least one); the counts then."""
    loop, db = config.loop, config.expand(config.loop.feedback_db)
    before = since.get("records", 0) + since.get("labels", 0)
    told = None
    while True:
        counts = feedback_counts(db) if Path(db).is_file() else {"records": 0, "labels": 0}
        new = counts["records"] + counts["labels"] - before
        due = loop.every_minutes is not None and time.monotonic() - last_round >= 60 * loop.every_minutes
        if new >= loop.min_new_feedback or (due and new > 0):
            return counts
        if new != told:
            log(f"[loop] waiting for feedback: {new} new of {loop.min_new_feedback}")
            told = new
        time.sleep(loop.poll_s)


def run_loop(config: RunConfig, address: str | None = None, log=print) -> list[dict]:
    """Serve and run rounds until loop.rounds have run (None: until interrupted); every version's record."""
    from rlhf_ray.pipeline.train import start_ray

    config = config.with_absolute_paths()
    if config.loop is None:
        raise LoopError("the config has no loop: section")
    run_dir = Path(config.run_dir)
    server = serve_config(config, config.model.policy)
    start_ray(config, address, extra_cpus=server.max_replicas * server.num_cpus)
    current = start_serving(config, run_dir)
    log(f"[loop] serving {current['id']} ({current['policy']}) at http://{config.loop.host}:{config.loop.port}/v1")
    rounds = 0
    last_round = time.monotonic()
    while config.loop.rounds is None or rounds < config.loop.rounds:
        versions = list_versions(run_dir)
        latest = versions[-1]
        if latest.get("decision") is None or "deploy" not in latest.get("steps", []):
            folder = versions_dir(run_dir) / latest["id"]  # a round that was cut short: finish it
        else:
            wait_for_feedback(config, latest.get("feedback") or {}, last_round, log)
            folder = begin_round(run_dir, latest["number"] + 1, version_record(run_dir, served(run_dir)["id"]))
        log(f"[loop] round {folder.name}")
        try:
            record = run_round(config, folder, lambda r: deploy_version(run_dir, r), address=address, log=log)
        except Exception as err:  # noqa: BLE001 - a round's failure: reported, the served version stays
            raise LoopError(f"round {folder.name} failed: {err}; still serving {served(run_dir)['id']}") from err
        log(f"[loop] {record['id']}: {record['decision']}; serving {served(run_dir)['id']}")
        rounds += 1
        last_round = time.monotonic()
    return list_versions(run_dir)
