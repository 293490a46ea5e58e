"""`rlhf-ray submit` and `rlhf-ray jobs` against a real Ray head started here, token authentication on.

The head is this module's own (`ray start --head --block` in its own temp dir and free ports) and is
stopped through its process tree only, never with `ray stop`, which would end every Ray on the machine.
It is given a token and no RAY_AUTH_MODE: Ray 2.60's `ray start` then turns token authentication on by
itself, as it does on a cluster node that holds a token.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from rlhf_ray.jobs.cli import build_parser
from rlhf_ray.jobs.submit import JobsError, build_job_request

REPO = Path(__file__).resolve().parents[1]
# a short quickstart: one iteration, with the quickstart's own pool (2 rollout workers of 0.5 CPU + 1 learner rank)
QUICK = ["train.iterations=1", "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=1"]
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(token: str | None = None, home: Path | None = None) -> dict[str, str]:
    """This process's environment without any Ray address or token, then the given token and home."""
    env = {key: value for key, value in os.environ.items() if key not in AUTH_ENV}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if home is not None:
        env["HOME"] = str(home)
    return env


def jobs_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_ray.jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Head:
    url: str
    token: str


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM to our `ray start --block`, which then stops what it started; SIGKILL to whatever of its
    process tree is left after a grace period. (`ray stop` would stop every Ray on the machine.)"""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=2)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def ray_head():
    root = tempfile.mkdtemp(prefix="rrjobs-", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(16)
    dashboard = free_port()
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    # 2 CPUs: the head of `ray start --head` on a 2-core machine, where the README's submit example must run
    command = [ray_cli, "start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dashboard}",
               "--dashboard-host=127.0.0.1", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--temp-dir={root}",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--disable-usage-stats"]
    log = open(Path(root) / "ray-start.log", "w")
    proc = subprocess.Popen(command, env=clean_env(token), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{(Path(root) / 'ray-start.log').read_text()}")
            try:
                if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard did not come up within 120 s")
            time.sleep(0.5)
        assert requests.get(f"{url}/api/authentication_mode", timeout=5).json() == {"authentication_mode": "token"}
        assert requests.get(f"{url}/api/version", timeout=5).status_code == 401  # no token: refused
        yield Head(url, token)
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def quickstart_job(ray_head, tmp_path_factory):
    """The one end-to-end submission of this suite: a short quickstart, followed to its end."""
    storage = tmp_path_factory.mktemp("storage")
    job_id = f"test-quickstart-{secrets.token_hex(3)}"
    proc = jobs_cli("submit", "experiments/quickstart.yaml", "--address", ray_head.url, "--storage-path",
                    str(storage), "--submission-id", job_id, "name=jobs-e2e", *QUICK,
                    env=clean_env(ray_head.token), timeout=400)
    return proc, job_id, storage


@pytest.mark.timeout(500)
def test_submit_runs_the_quickstart_to_succeeded_with_outputs_in_the_storage_path(quickstart_job):
    proc, job_id, storage = quickstart_job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"submitted job {job_id}" in proc.stdout
    assert f"job {job_id} SUCCEEDED" in proc.stdout
    assert "reward " in proc.stdout  # the job's own logs were followed: `rlhf-ray train`'s summary line
    run = storage / "jobs-e2e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1]
    assert rows[0]["pool/workers"] == 2  # the quickstart as written fits a head of 2 CPUs
    assert (run / "policy" / "config.json").is_file() and (run / "policy" / "tokenizer.json").is_file()
    assert "batch_size: 8" in (run / "config.yaml").read_text()


def test_jobs_status_and_logs_describe_the_finished_job(ray_head, quickstart_job):
    _, job_id, storage = quickstart_job
    env = clean_env(ray_head.token)
    status = jobs_cli("jobs", "status", job_id, "--address", ray_head.url, env=env)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id}: SUCCEEDED" in status.stdout
    assert f"run folder: {storage}/jobs-e2e" in status.stdout
    logs = jobs_cli("jobs", "logs", job_id, "--address", ray_head.url, env=env)
    assert logs.returncode == 0 and "after 1 iterations" in logs.stdout
    listing = jobs_cli("jobs", "list", "--address", ray_head.url, env=env)
    assert job_id in listing.stdout and "SUCCEEDED" in listing.stdout


def test_no_wait_returns_at_once_and_stop_stops_the_job(ray_head, tmp_path):
    env = clean_env(ray_head.token)
    job_id = f"test-stop-{secrets.token_hex(3)}"
    started = time.monotonic()
    proc = jobs_cli("submit", "experiments/quickstart.yaml", "--address", ray_head.url, "--no-wait",
                    "--storage-path", str(tmp_path), "--submission-id", job_id, "name=jobs-stop", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"submitted job {job_id}" in proc.stdout and time.monotonic() - started < 60
    stop = jobs_cli("jobs", "stop", job_id, "--address", ray_head.url, env=env)
    assert stop.returncode == 0, stop.stderr
    assert f"job {job_id}: STOPPED" in stop.stdout


def test_unknown_job_id_is_named(ray_head):
    proc = jobs_cli("jobs", "status", "no-such-job", "--address", ray_head.url, env=clean_env(ray_head.token))
    assert proc.returncode == 1
    assert "no job 'no-such-job' on this cluster" in proc.stderr


def test_missing_token_is_named_before_anything_is_uploaded(ray_head, tmp_path):
    proc = jobs_cli("submit", "experiments/quickstart.yaml", "--address", ray_head.url, "--storage-path",
                    str(tmp_path), *QUICK, env=clean_env(home=tmp_path))
    assert proc.returncode == 1
    assert "submitted job" not in proc.stdout
    assert f"the Ray cluster at {ray_head.url} uses token authentication and no token was found here" in proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr and f"{tmp_path}/.ray/auth_token" in proc.stderr


def test_wrong_token_is_rejected_naming_where_it_came_from(ray_head):
    proc = jobs_cli("jobs", "list", "--address", ray_head.url, env=clean_env("not-the-token"))
    assert proc.returncode == 1
    assert "rejected the authentication token from RAY_AUTH_TOKEN (403 Forbidden)" in proc.stderr


def test_token_in_the_default_file_is_found_like_ray_finds_it(ray_head, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(ray_head.token + "\n")
    proc = jobs_cli("jobs", "list", "--address", ray_head.url, env=clean_env(home=tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_unreachable_address_fails_fast_with_a_clear_message():
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    proc = jobs_cli("submit", "experiments/quickstart.yaml", "--address", address, "--storage-path", "/tmp/unused",
                    env=clean_env(), timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach the Ray dashboard at {address} (Connection refused)" in proc.stderr
    assert time.monotonic() - started < 30


# --- the job request, without a cluster ---------------------------------------------------------------------

def test_job_runs_rlhf_ray_train_from_the_uploaded_project_writing_to_the_storage_path(tmp_path):
    request = build_job_request(REPO / "experiments" / "quickstart.yaml", ["train.iterations=2"],
                                address="http://10.0.0.5:8265", storage_path=str(tmp_path))
    assert request.entrypoint == (f"rlhf-ray train experiments/quickstart.yaml train.iterations=2 "
                                  f"output_dir={tmp_path} --address auto")
    assert request.runtime_env["working_dir"] == str(REPO)
    assert {"runs/", ".git/", "__pycache__/"} <= set(request.runtime_env["excludes"])
    assert request.run_dir == f"{tmp_path}/quickstart"
    assert request.entrypoint_num_gpus == 0 and request.entrypoint_num_cpus == 0


def test_job_env_is_what_train_gives_its_workers():
    from rlhf_ray.learner.distributed import deepspeed_worker_env
    from rlhf_ray.pipeline.train import QUIET_ENV

    for use_gpu in (False, True):
        request = build_job_request(REPO / "experiments" / "quickstart.yaml", [f"learner.use_gpu={use_gpu}"],
                                    address="http://10.0.0.5:8265", storage_path="/shared/runs")
        env = request.runtime_env["env_vars"]
        assert {**deepspeed_worker_env(use_gpu), **QUIET_ENV}.items() <= env.items()
        # the same keys again in train's ray.init(runtime_env=...) would otherwise make Ray refuse to start the driver
        assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_relative_output_dir_is_refused_for_a_remote_cluster():
    with pytest.raises(JobsError, match="output_dir 'runs' is a relative path") as caught:
        build_job_request(REPO / "experiments" / "quickstart.yaml", address="http://10.0.0.5:8265")
    assert caught.value.exit_code == 2


def test_relative_output_dir_on_a_local_cluster_is_this_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    request = build_job_request(REPO / "experiments" / "quickstart.yaml", address="http://127.0.0.1:8265")
    assert request.run_dir == f"{tmp_path}/runs/quickstart"


def test_output_dir_override_becomes_the_storage_path():
    request = build_job_request(REPO / "experiments" / "quickstart.yaml", ["output_dir=/shared/x y"],
                                address="http://10.0.0.5:8265")
    assert request.entrypoint.count("output_dir=") == 1 and "'output_dir=/shared/x y'" in request.entrypoint


def test_config_outside_the_uploaded_folder_is_refused(tmp_path):
    config = tmp_path / "elsewhere.yaml"
    config.write_text("name: x\n")
    with pytest.raises(JobsError, match="outside the working directory"):
        build_job_request(config, address="http://10.0.0.5:8265", storage_path="/shared", working_dir=REPO)


def test_options_may_come_among_the_overrides():
    args = build_parser().parse_args(["submit", "x.yaml", "--address", "http://h:8265", "a=1", "--no-wait", "b=2"])
    assert (args.config, args.overrides, args.address, args.no_wait) == ("x.yaml", ["a=1", "b=2"], "http://h:8265", True)


def test_job_commands_join_an_existing_parser():
    import argparse

    from rlhf_ray.jobs.cli import add_job_commands

    parser = argparse.ArgumentParser(prog="rlhf-ray")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train")
    add_job_commands(commands)
    args = parser.parse_args(["jobs", "stop", "job-1", "--address", "http://h:8265", "--no-wait"])
    assert (args.command, args.jobs_command, args.job_id, args.no_wait) == ("jobs", "stop", "job-1", True)
