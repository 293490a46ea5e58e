"""The `loop`, `versions` and `rollback` commands of `rlhf-ray`.

    rlhf-ray loop CONFIG [key=value ...] [--address ADDR] [--rounds N]
    rlhf-ray versions RUN                       every version: parent, feedback, win rate, KL, decision, served
    rlhf-ray rollback RUN VERSION [--address ADDR]   serve an earlier version (the same zero-downtime swap)
"""

from __future__ import annotations

import sys


def cmd_loop(args) -> int:
    from rlhf_ray.cli import run_failed
    from rlhf_ray.config import load_config
    from rlhf_ray.loop.run import LoopError, run_loop

    config = load_config(args.config, args.overrides)
    if args.rounds is not None:
        if config.loop is None:
            print("rlhf-ray loop: the config has no loop: section", file=sys.stderr)
            return 2
        config = config.model_copy(update={"loop": config.loop.model_copy(update={"rounds": args.rounds})})
    try:
        run_loop(config, address=args.address)
    except LoopError as err:
        return run_failed(err)
    except KeyboardInterrupt:
        print("rlhf-ray loop: interrupted; `rlhf-ray loop` again goes on from the last finished step",
              file=sys.stderr)
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
    return 0


def cmd_versions(args) -> int:
    from rlhf_ray.loop.versions import format_versions, versions_dir

    if not versions_dir(args.run).is_dir():
        print(f"rlhf-ray versions: {args.run} has no versions/ (a run folder of `rlhf-ray loop`)", file=sys.stderr)
        return 1
    print(format_versions(args.run))
    return 0


def cmd_rollback(args) -> int:
    import ray

    from rlhf_ray.loop.run import deploy_version
    from rlhf_ray.loop.versions import VersionError, version_record

    try:
        record = version_record(args.run, args.version)
    except VersionError as err:
        print(f"rlhf-ray rollback: {err}", file=sys.stderr)
        return 1
    if record.get("decision") is None or not (record["id"] == "v0000" or "train" in record.get("steps", [])):
        print(f"rlhf-ray rollback: {args.version} has no finished policy (its round did not train one)",
              file=sys.stderr)
        return 1
    ray.init(address=args.address, log_to_driver=False)
    try:
        deploy_version(args.run, record, how="rollback")
    finally:
        ray.shutdown()
    print(f"serving {record['id']} ({record['policy']})")
    return 0


def add_loop_commands(commands) -> None:
    loop = commands.add_parser("loop", help="serve a policy and retrain, gate and redeploy it from its feedback")
    loop.add_argument("config", help="YAML run configuration with a loop: section")
    loop.add_argument("overrides", nargs="*", metavar="key=value")
    loop.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    loop.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (loop.rounds)")
    loop.set_defaults(func=cmd_loop)
    versions = commands.add_parser("versions", help="the versions of a looped policy")
    versions.add_argument("run", help="the run folder of `rlhf-ray loop`")
    versions.set_defaults(func=cmd_versions)
    rollback = commands.add_parser("rollback", help="serve an earlier version of a looped policy")
    rollback.add_argument("run", help="the run folder of `rlhf-ray loop`")
    rollback.add_argument("version", help="a version id of `rlhf-ray versions RUN`, e.g. v0001")
    rollback.add_argument("--address", default="auto", help="the Ray cluster serving it (default: auto)")
    rollback.set_defaults(func=cmd_rollback)
