"""The `serve` and `feedback` commands of `rlhf-ray`.

    rlhf-ray serve POLICY [--host H] [--port P] [--replicas N|MIN:MAX] [--api-key KEY] [--feedback-db DB]
                          [--address ADDR] [--set field=value ...]
    rlhf-ray feedback export DB [--out DIR]

`serve` starts (or joins, with --address) a Ray cluster, deploys the application of `rlhf_ray.serve.app`
and serves until Ctrl-C. `--set` takes any field of `ServeConfig` (`--set max_tokens_limit=512`). The API
key may also come from $RLHF_RAY_API_KEY, which keeps it out of the process list.
`feedback export` writes preferences.jsonl (prompt, chosen, rejected: the reward model's dataset),
ratings.jsonl and rating_stats.json. Exit status: 0 done, 1 the server failed, 2 a wrong argument.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
import time
from pathlib import Path

EXIT_FAILED = 1
EXIT_USAGE = 2


def _replicas(text: str) -> tuple[int, int]:
    from rlhf_ray.serve.config import parse_replicas

    try:
        return parse_replicas(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form field=value")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--set {key}: value {raw!r} is not valid YAML") from None


def serve_config_from_args(args):
    """The ServeConfig of the command line; local paths made absolute, since replicas do not share our cwd."""
    from pydantic import ValidationError

    from rlhf_ray.models.loading import resolve_model_path
    from rlhf_ray.serve.config import ServeConfig

    resolve_model_path(args.policy)  # fails here, with the known names, before Ray starts
    fields = dict(args.set or [])
    local = Path(args.policy).expanduser()
    fields["policy"] = str(local.resolve()) if local.exists() else args.policy  # a folder, or a model name
    fields["feedback_db"] = str(Path(args.feedback_db).expanduser().resolve())
    if args.replicas is not None:
        fields["min_replicas"], fields["max_replicas"] = args.replicas
    for name in ("model_name", "api_key", "max_batch_size", "num_cpus"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        return ServeConfig.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join((f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
                             + e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ValueError(problems) from None


def cmd_serve(args) -> int:
    from rlhf_ray.models.loading import ModelNotFoundError

    try:
        config = serve_config_from_args(args)
    except (ValueError, ModelNotFoundError) as err:
        print(f"rlhf-ray serve: {err}", file=sys.stderr)
        return EXIT_USAGE
    if config.api_key is None and config.resolved_api_key():
        config.api_key = config.resolved_api_key()  # a local cluster: hand the key to the replicas directly

    import ray
    from ray import serve

    from rlhf_ray.serve.app import APP_NAME
    from rlhf_ray.serve.deploy import deploy
    from rlhf_ray.serve.policy import model_name

    if args.address:
        ray.init(address=args.address)
    else:
        needed = config.max_replicas * config.num_cpus
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deploy(config)  # declaratively: `rlhf-ray loop` and `rollback` swap its policy in place
    except Exception as err:  # noqa: BLE001 - a replica that cannot start: say why, exit non-zero
        print(f"rlhf-ray serve: the application failed to start: {err}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return EXIT_FAILED
    auth = "API key required" if config.resolved_api_key() else "no API key (anyone who reaches the port may call)"
    print(f"serving {config.model_name or model_name(config.policy)} at http://{args.host}:{args.port}/v1 "
          f"({config.min_replicas}..{config.max_replicas} replicas, {auth}); feedback in {config.feedback_db}. "
          "Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if args.address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def cmd_feedback_export(args) -> int:
    from rlhf_ray.serve.feedback_export import export_feedback

    try:
        summary = export_feedback(args.db, args.out)
    except (FileNotFoundError, RuntimeError, sqlite3.DatabaseError) as err:
        print(f"rlhf-ray feedback export: {args.db}: {err}", file=sys.stderr)
        return EXIT_USAGE
    stats = json.loads(summary.stats.read_text())
    print(f"{summary.feedback_records} feedback records and {summary.labels} labels -> {summary.pairs} preference "
          f"pairs ({summary.preferences}), {summary.rated} ratings and likes ({summary.ratings}){summary.left_out()}")
    if stats["count"]:
        print(f"ratings: mean {stats['mean']:.2f} (std {stats['std']:.2f}, score {stats['score']:+.2f}), "
              f"histogram {stats['histogram']}  ({summary.stats})")
    return 0


def add_serve_commands(commands) -> None:
    """Add `serve` and `feedback export` to the subparsers of `rlhf-ray`."""
    serve = commands.add_parser("serve", help="serve a policy: OpenAI-compatible API and feedback on Ray Serve",
                                description="Serve POLICY on Ray Serve: GET /v1/models, POST /v1/completions, "
                                            "/v1/chat/completions (OpenAI shapes, streaming) and /v1/feedback, which "
                                            "stores ratings and preferences in a SQLite database; Ctrl-C stops.")
    serve.add_argument("policy", help="policy folder (runs/<name>/policy) or a built-in model name")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=_replicas, default=None, metavar="N|MIN:MAX",
                       help="model replicas, fixed or autoscaled between MIN and MAX (default 1)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health "
                            "(default: $RLHF_RAY_API_KEY, else none)")
    serve.add_argument("--feedback-db", default="feedback.db", help="SQLite file of completions and feedback")
    serve.add_argument("--model-name", default=None, help="the model id clients send (default: the run name)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="sequences a model replica decodes at once (1: no batching)")
    serve.add_argument("--num-cpus", type=float, default=None, help="Ray CPUs per model replica (default 1)")
    serve.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    serve.add_argument("--set", type=_override, action="append", metavar="field=value",
                       help="any ServeConfig field, e.g. --set max_tokens_limit=512 (repeatable)")
    serve.set_defaults(func=cmd_serve)

    feedback = commands.add_parser("feedback", help="the feedback collected by the server")
    actions = feedback.add_subparsers(dest="feedback_command", required=True)
    export = actions.add_parser("export", help="write the preference dataset and rating statistics")
    export.add_argument("db", help="the server's SQLite feedback database")
    export.add_argument("--out", default="feedback_export",
                        help="folder for preferences.jsonl, ratings.jsonl, rating_stats.json (default feedback_export)")
    export.set_defaults(func=cmd_feedback_export)
