"""The `submit` and `jobs` commands of `rlhf-ray`.

    rlhf-ray submit CONFIG --address http://HEAD:8265 [--no-wait] [--storage-path DIR] [key=value ...]
    rlhf-ray jobs status ID --address http://HEAD:8265
    rlhf-ray jobs logs ID [--follow] --address ...
    rlhf-ray jobs stop ID --address ...
    rlhf-ray jobs list --address ...

`add_job_commands(subparsers)` adds them to the `rlhf-ray` parser; `main(argv)` runs them on their own.
Exit status: 0 when the job SUCCEEDED (or the command did what it says), 1 when the job failed or was
stopped or the cluster cannot be reached or refuses the token, 2 for a wrong config or argument, 130 when
the user stops following (the job keeps running).
"""

from __future__ import annotations

import argparse
import sys
import time

from rlhf_ray.jobs.submit import (
    DEFAULT_TIMEOUT_S, EXIT_USAGE, JobsError, build_job_request, connect, dashboard_url, follow_logs, job_info,
    preflight_job, submit_job, wait_for_end,
)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class _IntermixedParser(argparse.ArgumentParser):
    """Options anywhere among the positionals: `submit CONFIG --address X a=1 b=2` (plain argparse
    stops at `--address` and then rejects `a=1 b=2`)."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS "
                             "or $RAY_ADDRESS)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up reaching the dashboard after this long (default {DEFAULT_TIMEOUT_S:g})")


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form KEY=VALUE")
    return key, value


def _fail(err: Exception, code: int | None = None) -> int:
    print(f"rlhf-ray: {err}", file=sys.stderr)
    return code if code is not None else getattr(err, "exit_code", EXIT_FAILED)


def _guarded(command):
    """Runs a command, turning the errors a user can act on into one line and an exit status."""

    def run(args) -> int:
        from rlhf_ray.config import ConfigError

        from rlhf_ray.errors import RunStopped, one_line

        try:
            return command(args)
        except ConfigError as err:
            return _fail(f"config error: {err}", EXIT_USAGE)
        except JobsError as err:
            return _fail(err)
        except RunStopped as err:  # the preflight: a dataset, model or reward of the run that cannot work
            return _fail(one_line(err), EXIT_FAILED)

    return run


def _final(job_id: str, status, client, run_dir: str | None = None) -> int:
    from ray.job_submission import JobStatus

    if status == JobStatus.SUCCEEDED:
        print(f"job {job_id} SUCCEEDED" + (f"; run folder: {run_dir}" if run_dir else ""))
        return 0
    info = client.get_job_info(job_id)
    why = f": {info.message}" if info.message else ""
    print(f"rlhf-ray: job {job_id} {status.value}{why}", file=sys.stderr)
    return EXIT_FAILED


def cmd_submit(args) -> int:
    request = build_job_request(
        args.config, args.overrides, address=dashboard_url(args.address), storage_path=args.storage_path,
        working_dir=args.working_dir, submission_id=args.submission_id, fresh=args.fresh, env=dict(args.env),
        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    url = dashboard_url(args.address)
    preflight_job(args.config, args.overrides, request.runtime_env["working_dir"])  # before anything is uploaded
    client = connect(url, timeout_s=args.timeout)
    job_id = submit_job(client, request)
    print(f"submitted job {job_id} to {url}\n"
          f"  entrypoint: {request.entrypoint}\n"
          f"  run folder: {request.run_dir} (on the cluster)\n"
          f"  logs: rlhf-ray jobs logs {job_id} --follow --address {url}\n"
          f"  stop: rlhf-ray jobs stop {job_id} --address {url}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\nrlhf-ray: stopped following; job {job_id} keeps running "
              f"(rlhf-ray jobs stop {job_id} --address {url})", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _final(job_id, status, client, request.run_dir)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_status(args) -> int:
    info = job_info(connect(args.address, timeout_s=args.timeout), args.job_id)
    print(f"job {args.job_id}: {info.status.value}")
    print(f"  entrypoint: {info.entrypoint}")
    if info.message:
        print(f"  message: {info.message}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    metadata = info.metadata or {}
    if "rlhf_ray.storage" in metadata:
        print(f"  run folder: {metadata['rlhf_ray.storage'].rstrip('/')}/{metadata.get('rlhf_ray.run', '')}")
    return 0


def cmd_logs(args) -> int:
    client = connect(args.address, timeout_s=args.timeout)
    job_info(client, args.job_id)  # a clear error for an unknown id
    if not args.follow:
        print(client.get_job_logs(args.job_id), end="")
        return 0
    try:
        status = follow_logs(client, args.job_id)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return _final(args.job_id, status, client)


def cmd_stop(args) -> int:
    client = connect(args.address, timeout_s=args.timeout)
    info = job_info(client, args.job_id)
    if info.status.is_terminal():
        print(f"job {args.job_id} had already ended: {info.status.value}")
        return 0
    client.stop_job(args.job_id)
    if args.no_wait:
        print(f"asked job {args.job_id} to stop")
        return 0
    status = wait_for_end(client, args.job_id, timeout_s=60.0)
    print(f"job {args.job_id}: {status.value}")
    return 0 if status.is_terminal() else EXIT_FAILED


def cmd_list(args) -> int:
    jobs = connect(args.address, timeout_s=args.timeout).list_jobs()
    for job in sorted(jobs, key=lambda job: job.start_time or 0):
        print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {_when(job.start_time)}  {job.entrypoint}")
    return 0


def add_job_commands(subparsers) -> None:
    """Adds `submit` and `jobs {status,logs,stop,list}` to the `rlhf-ray` subparsers."""
    submit = subparsers.add_parser("submit", help="run `rlhf-ray train` as a Ray Job on a running cluster",
                                   description="Submit `rlhf-ray train CONFIG` to a Ray cluster as a Ray Job and "
                                               "follow its logs; exit 0 only when the job SUCCEEDED.")
    submit.__class__ = _IntermixedParser  # add_parser builds the parent's parser class; options may come anywhere
    submit.add_argument("config", help="YAML run configuration, inside the project folder that is uploaded")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.iterations=5")
    _add_connection_arguments(submit)
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    submit.add_argument("--storage-path", default=None, metavar="DIR",
                        help="where the run folder goes on the cluster (default: the config's output_dir); "
                             "on a multi-node cluster a folder every node mounts")
    submit.add_argument("--working-dir", default=None, metavar="DIR",
                        help="the folder uploaded as the job's working directory (default: the project folder "
                             "holding the config, found by its pyproject.toml)")
    submit.add_argument("--submission-id", default=None, help="the job's id (default: rlhf-<name>-<time>-<hex>)")
    submit.add_argument("--fresh", action="store_true", help="pass --fresh to `rlhf-ray train` (no resume)")
    submit.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the job's processes (repeatable)")
    submit.add_argument("--entrypoint-num-cpus", type=float, default=0, metavar="N",
                        help="CPUs reserved for the driver (default 0: it only coordinates)")
    submit.add_argument("--entrypoint-num-gpus", type=float, default=0, metavar="N",
                        help="GPUs reserved for the driver (default 0: the learner's GPUs are its own)")
    submit.set_defaults(func=_guarded(cmd_submit))

    jobs = subparsers.add_parser("jobs", help="status, logs, stop and list of Ray Jobs on a cluster")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, command, text in [("status", cmd_status, "a job's status"), ("logs", cmd_logs, "a job's logs"),
                                ("stop", cmd_stop, "stop a job")]:
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID", help="the submission id that `rlhf-ray submit` printed")
        _add_connection_arguments(action)
        action.set_defaults(func=_guarded(command))
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="follow the logs until the job ends")
        if name == "stop":
            action.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
    listing = actions.add_parser("list", help="the jobs of the cluster")
    _add_connection_arguments(listing)
    listing.set_defaults(func=_guarded(cmd_list))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description="Ray Jobs of rlhf-ray runs")
    add_job_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
