"""`rlhf-ray train` as a Ray Job on a running cluster: the job request, the connection, the log follower.

A job runs `rlhf-ray train CONFIG [key=value ...] output_dir=STORAGE --address auto` on the head node.
Ray uploads the project folder as the job's working directory (without run outputs, .git and caches)
and puts it first on the job's Python path, so the code that runs is the code submitted. The run folder
goes to the storage path, `STORAGE/<name>/`: the config's `output_dir` unless `--storage-path` says
otherwise. On a multi-node cluster it must be storage every node mounts (NFS, EFS, Filestore, a PVC):
the driver writes `config.yaml` on the head, learner rank 0 writes metrics and checkpoints where it runs.

Token authentication (Ray >= 2.52). A cluster whose processes run with RAY_AUTH_MODE=token answers
HTTP requests only with `Authorization: Bearer <token>`: a 401 "Missing authentication token" without
one, a 403 with a wrong one. Ray 2.60 turns the mode on by itself in `ray start --head` when a token
exists on that node, and always in a bare `ray.init()` (which writes ~/.ray/auth_token). A token is
found, in this order, in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, in ~/.ray/auth_token
(Ray's `AuthenticationTokenLoader`). Ray's own `ray job submit` reads it only when the client also sets
RAY_AUTH_MODE=token (`get_auth_headers_if_auth_enabled`); here the token is read from the same sources
with the same loader whenever one exists (unless RAY_AUTH_MODE=disabled), and the cluster's public
`/api/authentication_mode` says whether one is needed, so a missing token is named before anything is
uploaded.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

import requests
import yaml

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_TIMEOUT_S = 5.0  # for reaching the dashboard: an unreachable address fails in seconds, not minutes
EXIT_USAGE = 2

# Never uploaded with the working directory: run outputs, version control, caches, environments.
# (gitwildmatch patterns, relative to the working directory; Ray also honours .gitignore and .rayignore)
WORKING_DIR_EXCLUDES = [
    "runs/", ".git/", "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.egg-info/",
    "build/", "dist/", ".venv*/", "venv/", "wandb/", ".ipynb_checkpoints/", ".devbundle/",
]

# The workers' environment of `rlhf_ray.pipeline.train.start_ray` (DeepSpeed's accelerator from
# `rlhf_ray.learner.distributed.deepspeed_worker_env`, and QUIET_ENV), copied here because importing
# those modules imports DeepSpeed (seconds); tests/test_jobs.py checks that the copies agree.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def deepspeed_accelerator_env(use_gpu: bool) -> dict[str, str]:
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}


class JobsError(RuntimeError):
    """A submission or job command that cannot go on; the message says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# --- the token ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str  # where it was found, for messages: "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH=...", a file

    def __repr__(self) -> str:  # never print the token itself
        return f"AuthToken(source={self.source!r})"


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return str(Path.home() / ".ray" / "auth_token")


def _read_token_like_ray() -> str:
    """The token by Ray's rules, without Ray: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
        if not token:  # Ray treats this as a misconfiguration, not as "no token"
            raise JobsError(f"RAY_AUTH_TOKEN_PATH is set to {path}, but that file cannot be read or is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else ""


def find_auth_token() -> AuthToken | None:
    """The cluster token this machine holds, found where Ray looks for it; None when there is none.

    RAY_AUTH_MODE=disabled means: send no token, as it does for Ray's own clients.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    try:
        from ray._raylet import AuthenticationTokenLoader
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token authentication (< 2.52)
        value = _read_token_like_ray()
    else:
        loader = AuthenticationTokenLoader.instance()
        try:
            value = loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else ""
        except AuthenticationError:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH is set to {os.environ.get('RAY_AUTH_TOKEN_PATH')}, "
                            "but that file cannot be read or is empty") from None
    return AuthToken(value, _token_source()) if value else None


def missing_token_message(url: str) -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return (f"the Ray cluster at {url} requires an authentication token, but RAY_AUTH_MODE=disabled is set "
                "here: unset it and provide the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    return (f"the Ray cluster at {url} uses token authentication and no token was found here: looked in "
            f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and {Path.home() / '.ray' / 'auth_token'}. Get the cluster's "
            "token (`ray get-auth-token` on the head node; on KubeRay `kubectl get secret CLUSTER "
            "-o jsonpath='{.data.auth_token}' | base64 -d`) and set RAY_AUTH_TOKEN=<token>, or save it to "
            "~/.ray/auth_token")


def rejected_token_message(url: str, token: AuthToken) -> str:
    return (f"the Ray cluster at {url} rejected the authentication token from {token.source} (403 Forbidden): "
            "it is not this cluster's token. Use the token of the cluster's head node (`ray get-auth-token` there)")


# --- the connection -------------------------------------------------------------------------------------

def dashboard_url(address: str | None) -> str:
    """The dashboard URL for `address` (`http://HEAD:8265`, or `HEAD:8265`); when None, RAY_API_SERVER_ADDRESS
    or an http(s) RAY_ADDRESS, as Ray's job CLI reads them."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None))
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard of the cluster)",
                        EXIT_USAGE)
    if address.startswith("ray://") or address == "auto":
        raise JobsError(f"--address {address}: jobs are submitted to the cluster's dashboard, "
                        "an http(s) address such as http://HEAD:8265", EXIT_USAGE)
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _why(err: Exception) -> str:
    """'Connection refused' out of requests' nested 'HTTPConnectionPool(...): Max retries exceeded ...'."""
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    return "timed out" if isinstance(err, requests.exceptions.Timeout) else type(err).__name__


@contextmanager
def _address_env_ignored():
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address; here --address wins."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> "JobSubmissionClient":
    """A job client for the cluster at `address`, authenticated when the cluster asks for a token.

    Raises JobsError, within about `timeout_s`, when the dashboard cannot be reached, when it needs a
    token that this machine does not have, or when it rejects the token.
    """
    url = dashboard_url(address)
    hint = ("is the cluster up, and is this its dashboard address (port 8265 by default; `ray dashboard "
            "CLUSTER.yaml` or `kubectl port-forward svc/CLUSTER-head-svc 8265:8265` forward it)?")
    try:
        answer = requests.get(f"{url}/api/authentication_mode", timeout=timeout_s)
    except requests.exceptions.Timeout:
        raise JobsError(f"the Ray dashboard at {url} did not answer within {timeout_s:g} s: {hint}") from None
    except requests.exceptions.RequestException as err:
        raise JobsError(f"cannot reach the Ray dashboard at {url} ({_why(err)}): {hint}") from None
    mode = None
    if answer.ok and answer.headers.get("content-type", "").startswith("application/json"):
        mode = answer.json().get("authentication_mode")  # absent before Ray 2.52: then the version check tells
    token = find_auth_token()
    if mode == "token" and token is None:
        raise JobsError(missing_token_message(url))
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        version = requests.get(f"{url}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.RequestException as err:
        raise JobsError(f"cannot reach the Ray dashboard at {url} ({_why(err)}): {hint}") from None
    if version.status_code == 401:
        raise JobsError(missing_token_message(url))
    if version.status_code == 403 and token is not None:
        raise JobsError(rejected_token_message(url, token))
    if version.status_code != 200:
        raise JobsError(f"{url} answered {version.status_code} to /api/version: it does not look like a Ray "
                        f"dashboard: {hint}")
    from ray.job_submission import JobSubmissionClient

    with _address_env_ignored():
        return JobSubmissionClient(url, headers=headers)


# --- the job request ------------------------------------------------------------------------------------

@dataclass
class JobRequest:
    """What `JobSubmissionClient.submit_job` gets, and where the run's outputs will be."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    run_dir: str  # STORAGE/<name> on the cluster
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float = 0
    entrypoint_num_gpus: float = 0


def project_root(start: Path) -> Path:
    """The nearest folder from `start` upwards that holds a pyproject.toml; the current folder if none does."""
    for folder in [start.resolve(), *start.resolve().parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd().resolve()


def _is_local(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}


def resolve_storage_path(path: str, url: str) -> str:
    """The absolute storage path the job writes to; a relative one only makes sense for a local cluster."""
    if "://" in path:
        raise JobsError(f"storage path {path!r}: `rlhf-ray train` writes to a file system path; mount the bucket "
                        "on every node (e.g. s3fs, gcsfuse) and pass the mount point", EXIT_USAGE)
    if Path(path).is_absolute():
        return path
    if _is_local(url):  # the cluster shares this machine's file system
        return str(Path(path).expanduser().resolve())
    raise JobsError(f"output_dir {path!r} is a relative path: in a Ray Job it would land in the job's temporary "
                    f"working directory on the cluster and be lost. Pass --storage-path /shared/runs (a folder "
                    f"every node of the cluster mounts) or output_dir=/shared/runs", EXIT_USAGE)


def _override_value(value: str) -> str:
    """`value` as the right side of a key=value override (read back as YAML): quoted only when it must be."""
    return value if yaml.safe_load(value) == value else yaml.safe_dump(value, default_style='"').strip()


def default_submission_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    return f"rlhf-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def build_job_request(config_path: str | Path, overrides: list[str] = (), *, address: str,
                      storage_path: str | None = None, working_dir: str | Path | None = None,
                      submission_id: str | None = None, fresh: bool = False, env: dict[str, str] | None = None,
                      entrypoint_num_cpus: float = 0, entrypoint_num_gpus: float = 0) -> JobRequest:
    """The Ray Job that runs `rlhf-ray train config_path overrides` on the cluster at `address`.

    The config is loaded and validated here, so a wrong key fails before anything is uploaded.
    The entrypoint holds no resources by default: the driver only coordinates, and a GPU held by it
    is a GPU the learner cannot have (on a cluster with exactly `learner.num_workers` GPUs the run would
    wait forever).
    """
    from rlhf_ray.config import load_config

    config_path = Path(config_path)
    config = load_config(config_path, list(overrides))
    root = Path(working_dir).resolve() if working_dir else project_root(config_path.parent)
    try:
        config_in_root = config_path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise JobsError(f"config {config_path} is outside the working directory {root} that is uploaded to the "
                        "cluster: move it under that folder or pass --working-dir", EXIT_USAGE) from None
    storage = resolve_storage_path(storage_path or config.output_dir, dashboard_url(address))
    excludes = list(WORKING_DIR_EXCLUDES)
    try:  # a storage folder inside the project (a local cluster) is output, never upload it
        excludes.append(Path(storage).resolve().relative_to(root).as_posix().rstrip("/") + "/")
    except ValueError:
        pass
    use_gpu = config.learner.use_gpu or config.rollout.use_gpu
    env_vars = {
        **deepspeed_accelerator_env(config.learner.use_gpu), **QUIET_ENV, "PYTHONUNBUFFERED": "1",
        # `rlhf-ray train` passes the same worker variables to its own ray.init(runtime_env=...); Ray refuses
        # to merge a job's and a driver's runtime_env that set the same key unless this is set.
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
        **(env or {}),
    }
    kept = [text for text in overrides if text.partition("=")[0] != "output_dir"]
    command = ["rlhf-ray", "train", config_in_root, *kept, f"output_dir={_override_value(storage)}",
               "--address", "auto"]
    if fresh:
        command.append("--fresh")
    return JobRequest(
        entrypoint=shlex.join(command),
        runtime_env={"working_dir": str(root), "excludes": excludes, "env_vars": env_vars},
        submission_id=submission_id or default_submission_id(config.name),
        run_dir=f"{storage.rstrip('/')}/{config.name}",
        metadata={"rlhf_ray.config": config_in_root, "rlhf_ray.run": config.name, "rlhf_ray.storage": storage,
                  "rlhf_ray.gpu": str(use_gpu).lower()},
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )


def preflight_job(config_path: str | Path, overrides: list[str], working_dir: str | Path) -> None:
    """`rlhf_ray.pipeline.preflight` here, before the upload, as the job will see the project: paths and
    imports relative to the working directory. Absolute paths that only the cluster has (a shared mount)
    are left to the job's own preflight, which `rlhf-ray train` runs when it starts there."""
    from rlhf_ray.config import load_config
    from rlhf_ray.pipeline.preflight import preflight

    config_path, root, cwd = Path(config_path).resolve(), str(Path(working_dir).resolve()), os.getcwd()
    sys.path.insert(0, root)  # the job puts its working directory first on the Python path
    try:
        os.chdir(root)
        preflight(load_config(config_path, list(overrides)).with_absolute_paths(), stages=("ppo",), on_cluster=True)
    finally:
        os.chdir(cwd)
        sys.path.remove(root)


def submit_job(client: "JobSubmissionClient", request: JobRequest) -> str:
    """Uploads the working directory and starts the job; returns its submission id."""
    try:
        return client.submit_job(
            entrypoint=request.entrypoint, runtime_env=request.runtime_env, submission_id=request.submission_id,
            metadata=request.metadata, entrypoint_num_cpus=request.entrypoint_num_cpus or None,
            entrypoint_num_gpus=request.entrypoint_num_gpus or None,
        )
    except RuntimeError as err:  # the job server's answer, e.g. a submission id already taken
        raise JobsError(f"the cluster refused the job: {err}") from None


# --- following a job ------------------------------------------------------------------------------------

def is_terminal(status: "JobStatus") -> bool:
    return status.is_terminal()


def wait_for_end(client: "JobSubmissionClient", job_id: str, timeout_s: float = 60.0) -> "JobStatus":
    """The job's status once it is terminal (or the last one seen after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not is_terminal(status) and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status


def follow_logs(client: "JobSubmissionClient", job_id: str, out: TextIO = sys.stdout) -> "JobStatus":
    """Prints the job's logs as they come until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # the stream broke (a dashboard restart, a network cut): the job may go on
        raise JobsError(f"lost the log stream of job {job_id} ({err}); it may still be running: "
                        f"`rlhf-ray jobs status {job_id} --address ...`") from None
    return wait_for_end(client, job_id)


def job_info(client: "JobSubmissionClient", job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobsError(f"no job {job_id!r} on this cluster (`rlhf-ray jobs list` shows them)") from None
        raise JobsError(f"could not get job {job_id!r}: {err}") from None
