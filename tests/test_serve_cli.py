"""`rlhf-ray serve` end to end: the command starts its own Ray, serves, and stops cleanly on Ctrl-C.
Slow (a fresh Ray and Serve, about a minute): run with `-m slow`."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_command_serves_the_policy_until_interrupted(tiny_model_dir, tmp_path):
    port, db = free_port(), tmp_path / "feedback.db"
    env = {**os.environ, "RLHF_RAY_API_KEY": "cli-key"}  # the key from the environment, not argv
    command = [sys.executable, "-m", "rlhf_ray.cli", "serve", str(tiny_model_dir), "--port", str(port),
               "--feedback-db", str(db), "--model-name", "tiny", "--set", "max_tokens_limit=8", "--set", "default_max_tokens=4"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines = time.time() + 240, []
        while time.time() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            if line.startswith("serving tiny") or server.poll() is not None:
                break
        assert lines[-1].startswith("serving tiny at"), "".join(lines[-30:])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/v1/models").status_code == 401
            headers = {"Authorization": "Bearer cli-key"}
            body = client.post("/v1/completions", headers=headers,
                               json={"model": "tiny", "prompt": "the movie", "max_tokens": 9})
            assert body.status_code == 400 and "at most 8" in body.json()["error"]["message"]
            body = client.post("/v1/completions", headers=headers,
                               json={"model": "tiny", "prompt": "the movie", "max_tokens": 8})
            assert body.status_code == 200
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert db.is_file()
