"""Exact resume: SIGKILL the driver mid-run, run the same command again, get the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["train.iterations=6", "train.checkpoint_every=2", "rollout.batch_size=8", "ppo.minibatch_size=4",
        "ppo.epochs=2", "rollout.workers.min=1", "rollout.workers.max=1", "ppo.kl.adaptive=true",
        "ppo.kl.horizon=100"]
COMPARED = ["rollout/reward_mean", "objective/kl", "objective/kl_coef", "policy/loss", "val/vf_loss",
            "policy/approxkl", "rollout/response_len"]


def command(output_dir, name):
    return [sys.executable, "-m", "rlhf_ray.cli", "train", "experiments/quickstart.yaml", f"output_dir={output_dir}",
            f"name={name}", *ARGS]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_driver_resumes_exactly_from_the_last_checkpoint(tmp_path):
    uninterrupted = subprocess.run(command(tmp_path / "a", "run"), capture_output=True, text=True, timeout=900)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    # the driver and the local Ray it started die together, as when the driver's machine goes
    proc = subprocess.Popen(command(tmp_path / "b", "run"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert 3 <= killed_at < 6, "the driver should die mid-run, past the checkpoint of iteration 2"

    resumed = subprocess.run(command(tmp_path / "b", "run"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    expected, got = rows(tmp_path / "a" / "run"), rows(tmp_path / "b" / "run")
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 5, 6]  # none repeated, none skipped
    assert [r["policy_version"] for r in got] == [1, 2, 3, 4, 5, 6]
    for want, have in zip(expected, got):
        for name in COMPARED:
            assert have[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), (have["iteration"], name)


def test_lost_learner_worker_restarts_from_the_last_checkpoint(tmp_path):
    import psutil

    proc = subprocess.Popen(command(tmp_path, "learner_loss"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics = tmp_path / "learner_loss" / "metrics.jsonl"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        # the learner rank of this run (its Ray processes share the driver's session)
        learners = [p for p in psutil.process_iter(["pid", "cmdline"])
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and os.getsid(p.info["pid"]) == proc.pid]
        assert len(learners) == 1
        learners[0].kill()
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from" in output
    got = rows(tmp_path / "learner_loss")
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in got] == [1, 2, 3, 4, 5, 6]
