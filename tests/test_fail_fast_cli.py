"""`rlhf-ray train` on the user's mistakes: one clear last line, the right exit status, in seconds.

Preflight (before Ray starts): a reward that cannot be imported, raises, returns NaN or one score too few,
a malformed dataset line, a missing model. During the run: a reward that fails on iteration 2 stops the
run at once, with no learner restart, its checkpoint intact, and the same command resumes once it is fixed.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).parent
SHORT = ["train.iterations=2", "train.checkpoint_every=1", "rollout.batch_size=4", "ppo.minibatch_size=4",
         "ppo.epochs=1", "rollout.workers.min=1", "rollout.workers.max=1"]


def rlhf_ray(*args, env=None, timeout=300):
    """The real command in a new process (cwd: the repository); the tests' reward modules on its path, and
    on its Ray workers' (a local Ray's workers inherit the driver's environment)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - started


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_reward_that_cannot_be_imported_fails_in_seconds_before_ray_starts(tmp_path):
    proc, seconds = rlhf_ray("train", "experiments/quickstart.yaml", "reward.function=no.such:fn",
                             f"output_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert seconds < 60  # a hang detector: today's fix takes about 6 s, most of it imports
    assert last_line(proc.stderr) == ("rlhf-ray: reward.function: reward 'no.such:fn': cannot import module 'no.such' "
                                      "(No module named 'no'); expected 'package.module:function' with an importable "
                                      "module")
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    assert not (tmp_path / "quickstart").exists()  # nothing written


@pytest.mark.parametrize("function, expected", [
    ("user_code:raises", "rlhf-ray: reward.function: reward 'user_code:raises' raised KeyError: 'quality' "
                         "(scoring a batch of 4 (prompt, response) pairs)"),
    ("user_code:returns_nan", "rlhf-ray: reward.function: reward 'user_code:returns_nan' returned a non-finite score "
                              "(nan) for item 0"),
    ("user_code:one_too_few", "rlhf-ray: reward.function: reward 'user_code:one_too_few' returned scores of shape (3,) "
                              "for 4 (prompt, response) pairs; expected shape (4,), one score per pair"),
])
def test_a_broken_reward_is_called_once_on_the_driver_and_named(tmp_path, capsys, function, expected):
    started = time.monotonic()
    status = main(["train", "experiments/quickstart.yaml", f"reward.function={function}", f"output_dir={tmp_path}"])
    assert status == 1 and time.monotonic() - started < 60
    assert last_line(capsys.readouterr().err).startswith(expected)
    assert not (tmp_path / "quickstart").exists()


def test_a_malformed_prompt_line_is_named_by_file_and_line(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "the movie was"}\n{"prompt": "the food was"\n{"prompt": "my day was"}\n')
    status = main(["train", "experiments/quickstart.yaml", f"data.prompt_dataset={{path: {data}}}",
                   f"output_dir={tmp_path}"])
    assert status == 1
    assert last_line(capsys.readouterr().err).startswith(f"rlhf-ray: data.prompt_dataset: {data}:2: ")


def test_a_missing_model_is_named_by_its_key(tmp_path, capsys):
    status = main(["train", "experiments/quickstart.yaml", f"model.policy={tmp_path}/no-such-model",
                   f"output_dir={tmp_path}"])
    assert status == 1
    assert last_line(capsys.readouterr().err) == (f"rlhf-ray: model.policy: model '{tmp_path}/no-such-model' not "
                                                  "found: not a local folder, and not a known model (known: "
                                                  "rlhf-ray/tiny-chat-gpt2, rlhf-ray/tiny-gpt2, rlhf-ray/tiny-llama)")


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_a_reward_failing_on_iteration_2_stops_the_run_at_once_and_the_fixed_run_resumes(tmp_path):
    # iteration 1 takes prompts 0-3, iteration 2 prompts 4-7: the reward raises on prompt 5 (user_code.MARKER);
    # the preflight calls it on the first 4 prompts only, so the run starts
    prompts = ["the movie was", "the food was", "the day was", "the book is", "my day was", "the day was cold",
               "our team is", "i felt"]
    args = ["train", "experiments/quickstart.yaml", "name=late", f"output_dir={tmp_path}", *SHORT,
            "train.iterations=3", "reward.function=user_code:fails_on_marker", f"data.prompts={json.dumps(prompts)}"]
    proc, seconds = rlhf_ray(*args)
    run = tmp_path / "late"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert seconds < 240
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("rlhf-ray: reward 'user_code:fails_on_marker' raised ValueError: the scoring service "
                                "rejected the request (HTTP 422) (scoring a batch of ")
    assert lines[-2] == f"rlhf-ray: the traceback is in {run / 'error.log'}"
    assert "fails_on_marker" in (run / "error.log").read_text()
    # not retried: one learner start, and the reason recorded; iteration 1's checkpoint intact, no final policy
    assert [e["event"] for e in events(run)] == ["launch", "learner_start", "stopped"]
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "checkpoints" / "iter_000001" / "run_state.json").is_file()
    assert not (run / "policy").exists()

    proc, _ = rlhf_ray(*args, env={"USER_CODE_FIXED": "1"})  # the user fixed the function: the same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = [e for e in events(run) if e["event"] == "learner_start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith("iter_000001")
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "policy" / "config.json").is_file()


def test_label_calls_its_scripted_annotator_once_before_sampling(tmp_path, capsys):
    status = main(["label", "--policy", "rlhf-ray/tiny-gpt2", "--prompts", "experiments/data/prompts.jsonl",
                   "--out", str(tmp_path / "prefs.jsonl"), "--annotator", "scripted:user_code:returns_nan"])
    assert status == 1
    assert last_line(capsys.readouterr().err).startswith(
        "rlhf-ray: --annotator: reward 'user_code:returns_nan' returned a non-finite score (nan) for item 0")
    assert not list(tmp_path.iterdir())  # no pairs sampled, nothing written


def test_eval_calls_the_reward_once_before_the_models_sample(tiny_model_dir, tmp_path, capsys):
    status = main(["eval", str(tiny_model_dir), "--config", "experiments/quickstart.yaml", "reward.function=user_code:raises",
                   "--prompts", "experiments/data/prompts_heldout.jsonl", "--out", str(tmp_path / "eval")])
    assert status == 1
    assert last_line(capsys.readouterr().err).startswith(
        "rlhf-ray eval: reward: reward 'user_code:raises' raised KeyError: 'quality' (scoring a batch of 4 ")
    assert not (tmp_path / "eval").exists()


def test_submit_runs_the_preflight_before_connecting_or_uploading(capsys):
    # no cluster listens at this address: the preflight fails first, naming the reward
    status = main(["submit", "experiments/quickstart.yaml", "--address", "http://127.0.0.1:9", "--storage-path",
                   "/tmp/never-written", "reward.function=user_code:one_too_few"])
    assert status == 1
    assert last_line(capsys.readouterr().err).startswith(
        "rlhf-ray: reward.function: reward 'user_code:one_too_few' returned scores of shape (3,) for 4")
