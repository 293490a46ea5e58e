"""`rlhf-ray train` end to end on a local Ray: the run folder a user gets."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

REQUIRED_METRICS = {
    "objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac",
    "rollout/reward_mean", "rollout/response_len", "perf/rollout_tokens_per_s", "perf/learner_tokens_per_s",
    "perf/sync_s", "pool/workers",
}


def run_train(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "train", "experiments/quickstart.yaml", f"output_dir={tmp_path}",
           "train.iterations=2", "train.checkpoint_every=1", "rollout.batch_size=8", "ppo.minibatch_size=4",
           "ppo.epochs=1", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_train_writes_metrics_checkpoints_and_a_loadable_policy(tmp_path):
    proc = run_train(tmp_path, "name=e2e", "rollout.workers.min=2", "rollout.workers.max=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    assert "rollout:\n  batch_size: 8" in (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert REQUIRED_METRICS <= set(rows[0]) and rows[0]["pool/workers"] == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for iteration in (1, 2):
        checkpoint = run / "checkpoints" / f"iter_{iteration:06d}"
        assert json.loads((checkpoint / "run_state.json").read_text())["iteration"] == iteration
        assert (checkpoint / "actor").is_dir() and (checkpoint / "critic").is_dir()
    policy = AutoModelForCausalLM.from_pretrained(run / "policy")
    assert policy.config.vocab_size == 54
    assert (run / "policy" / "tokenizer.json").exists()


def test_train_without_critic_grpo_evaluating_on_held_out_prompts(tmp_path):
    """GRPO with the KL coefficient 0 (no reference pass), evaluated before training and after iteration 2,
    with DAPO's dynamic sampling and overlong shaping."""
    proc = run_train(tmp_path, "name=grpo", "ppo.advantage_estimator=grpo", "ppo.group_size=2",
                     "rollout.batch_size=4", "ppo.kl.coef=0", "train.eval_every=2", "train.eval_prompts=6",
                     "data.eval_dataset.path=experiments/data/prompts_heldout.jsonl", "ppo.dynamic_sampling=true",
                     "ppo.overlong_buffer=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert "val/vf_loss" not in rows[1] and "objective/kl" not in rows[1]  # no critic, no reference pass
    assert not (tmp_path / "grpo" / "checkpoints" / "iter_000001" / "critic").exists()
    assert 0 <= rows[1]["rollout/logprob_diff_max"] < 1e-3  # learner and sampler: the same policy
    for row in rows[1:]:  # the tiny model's answers often all score 0: groups to drop and rounds to add
        assert 1 <= row["rollout/sampling_rounds"] <= 3 and 0 <= row["rollout/informative_frac"] <= 1
        assert row["rollout/sampling_rounds"] == 1 or row["rollout/informative_frac"] < 1
    before, after = rows[0], rows[2]
    assert "eval/reward_mean" not in rows[1]
    assert abs(before["eval/kl"]) < 1e-3 < after["eval/kl"]  # the start policy is the reference
    assert "held-out reward" in proc.stdout and after["perf/eval_s"] > 0
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [0] * 6 + [2] * 6  # every held-out answer, before and after
    assert sum(s["reward"] for s in samples[6:]) / 6 == pytest.approx(after["eval/reward_mean"])
    events = [json.loads(line) for line in (tmp_path / "grpo" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["launch", "learner_start"]
    assert events[1]["torch_threads"] == 2  # the rollout workers wait for the update: both cores


def test_train_with_overlap_micro_batches_and_continuous_batching(tmp_path):
    """Rollouts one version behind the learner (decoupled PPO), token-budget micro-batches, 3 rows per worker."""
    proc = run_train(tmp_path, "name=fast", "train.iterations=3", "rollout.overlap=true", "rollout.max_batch=3",
                     "learner.micro_batch_tokens=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    # iteration 1 waits for its episodes; iterations 2 and 3 train on episodes made while the learner
    # trained on the one before, by the policy of one version earlier
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1]
    assert "policy/behaviour_weight_mean" not in rows[0]
    assert all(0.5 < r["policy/behaviour_weight_mean"] <= 2.0 for r in rows[1:])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fast" / "policy").config.vocab_size == 54


def test_train_config_error_exits_2_before_starting_ray(tmp_path):
    proc = run_train(tmp_path, "ppo.epoch=3")
    assert proc.returncode == 2
    assert "unknown key 'ppo.epoch'; did you mean 'ppo.epochs'?" in proc.stderr


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The README's quickstart: the task reward clearly rises over the run."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "experiments/quickstart.yaml",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["rollout/reward_mean"] for r in rows[:5]) / 5
    last = sum(r["rollout/reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_more_learner_workers_than_the_cluster_has_fails_at_once(tmp_path):
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.pipeline.train import TrainingError, train

    config = load_config("experiments/quickstart.yaml", [f"output_dir={tmp_path}", "learner.num_workers=4",
                                                         "ppo.minibatch_size=16"])
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(TrainingError, match=r"learner.num_workers=4 .* need 5 CPUs, but the Ray cluster has 2"):
            train(config, progress=False)
    finally:
        ray.shutdown()


def test_use_gpu_without_a_gpu_fails_with_a_clear_message(tmp_path):
    proc = run_train(tmp_path, "learner.use_gpu=true")
    assert proc.returncode == 1
    assert "learner.use_gpu is true with learner.num_workers=1, but the Ray cluster has 0 GPU(s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_starts_its_own_ray_beside_a_ray_already_running_on_the_machine(tmp_path):
    """Without --address, `rlhf-ray train` starts a local Ray even where a `ray start` head runs on this machine
    (a bare ray.init() would join that one and refuse num_cpus)."""
    import os
    import shutil
    import signal
    import socket

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus=1", f"--port={free_port()}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = ("import ray, time\n"
                "for _ in range(120):  # the head is up once a bare ray.init() can join it\n"
                "    try:\n"
                "        ray.init(); ray.shutdown(); break\n"
                "    except Exception:\n"
                "        time.sleep(0.5)\n"
                "from rlhf_ray.config import RunConfig\n"
                "from rlhf_ray.pipeline.train import start_ray\n"
                "start_ray(RunConfig(), None)\n"
                "print(int(ray.cluster_resources()['CPU']))\n"
                "ray.shutdown()\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert int(out.stdout.split()[-1]) >= 2  # its own instance, not the head's single CPU
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started...
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:  # ...or is made to
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=20)


def test_the_progress_bar_shows_the_latest_held_out_reward_and_the_kl_it_has():
    from rlhf_ray.pipeline.train import progress_fields

    row = {"iteration": 3, "rollout/reward_mean": 0.25, "objective/kl": 1.5, "pool/workers": 2}
    assert progress_fields(row, None) == {"reward": "+0.250", "kl": "1.500", "workers": "2"}
    # KL coefficient 0 (no reference pass): the held-out KL of the last evaluation
    row = {"iteration": 4, "rollout/reward_mean": 0.5, "eval/reward_mean": 0.75, "eval/kl": 2.0, "pool/workers": 1}
    assert progress_fields(row, 0.75) == {"reward": "+0.500", "eval": "+0.750", "kl": "2.000", "workers": "1"}
    assert progress_fields({"iteration": 0, "eval/reward_mean": 0.1, "eval/kl": 0.0}, 0.1) == {"eval": "+0.100",
                                                                                               "kl": "0.000"}
