"""Human feedback end to end on a 2-core CPU: serve a policy, let people label, chat and rate on the feedback
pages' routes, train H and S from what they gave, run PPO against R = Q + lambda S + mu H, and have the
same people judge the new policy against the old in a blind study.

    python experiments/feedback_demo.py [--out runs] [--prompts 240] [--chats 240] [--study-prompts 40]

The people are simulated (rlhf_ray.simulated_users: three annotators with their own keys, each judging a
text by the toy task's sentiment score plus their own noise), but everything they do goes over HTTP to a real `rlhf-ray serve`,
as a browser would: answers with n = 2 fill the "served" queue, `/ui/api/labels` takes their A/B labels
and ratings, `/ui/api/chat` and `/ui/api/feedback` their chats, likes and ratings. Every step is an
`rlhf-ray` command on experiments/pipeline_feedback.yaml; the figures printed at the end are read from
the files those commands wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rlhf_ray.simulated_users import Population, make_people  # noqa: E402

CONFIG = REPO / "experiments" / "pipeline_feedback.yaml"
PEOPLE = {"alice": 0.05, "bob": 0.10, "carol": 0.15}  # each person's judgement noise
CONCURRENCY = 8


def rlhf_ray(*argv: str, capture: bool = False) -> str:
    print("$ rlhf-ray " + " ".join(argv), flush=True)
    result = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *argv], cwd=REPO, text=True,
                            capture_output=capture)
    if result.returncode != 0:
        sys.exit(f"rlhf-ray {argv[0]} failed ({result.returncode}):\n{result.stderr if capture else ''}")
    return result.stdout if capture else ""


class Server:
    """`rlhf-ray serve POLICY` in a child process, stopped with Ctrl-C."""

    def __init__(self, policy: Path, db: Path, api_key: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "rlhf_ray.cli", "serve", str(policy), "--port", str(self.port),
                   "--feedback-db", str(db), "--model-name", "policy", "--api-key", api_key,
                   "--set", "default_max_tokens=10"]
        print(f"$ rlhf-ray serve {policy} --feedback-db {db} ...", flush=True)
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True).start()
        deadline = time.time() + 240
        while not any(line.startswith("serving ") for line in self.output):
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit("rlhf-ray serve did not start within 240 s:\n" + "".join(self.output[-30:]))
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


async def collect_feedback(server: Server, api_key: str, people: list, prompts: list[str],
                           chat_prompts: list[str]) -> dict:
    """What people give on the served policy: labels of its answer pairs, and chats with ratings and likes."""
    async with Population(server.base, people, api_key=api_key, concurrency=CONCURRENCY) as population:
        await population.ask(prompts, n=2, max_tokens=10)  # two answers per question: the "served" queue
        labels = await population.label("served", rate=0.5)
        chats = await population.chat(chat_prompts, max_tokens=10)
    return {"labels": labels, "chat_ratings": chats["ratings"], "chat_likes": chats["likes"]}


async def judge_study(server: Server, api_key: str, people: list, study: str) -> int:
    async with Population(server.base, people, api_key=api_key, concurrency=CONCURRENCY) as population:
        return await population.judge(study)


def prompts_of(path: Path, count: int, skip: int = 0) -> list[str]:
    """`count` prompts of `path` from line `skip` on, starting again from the top when the file ends."""
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    return [prompts[(skip + i) % len(prompts)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="output_dir of the run (default runs)")
    parser.add_argument("--prompts", type=int, default=240, help="questions answered twice and labelled")
    parser.add_argument("--chats", type=int, default=240, help="chat turns rated or liked")
    parser.add_argument("--study-prompts", type=int, default=40, help="held-out prompts of the blind study")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    run = out / "pipeline_feedback"
    db = out / "pipeline_feedback_feedback.db"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    common = [str(CONFIG), f"output_dir={out}", f"reward_model.feedback_db={db}", f"satisfaction_model.feedback_db={db}"]
    timings = {}

    def step(name, fn):
        begun = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - begun
        return value

    step("sft", lambda: rlhf_ray("pipeline", *common, "--stages", "sft"))
    keys = {name: rlhf_ray("annotators", "add", name, "--db", str(db), capture=True).strip().splitlines()[-1]
            for name in PEOPLE}
    people = make_people("envs.builtin:sentiment_reward", PEOPLE, keys, seed=0)
    api_key = secrets.token_urlsafe(16)
    train_prompts = prompts_of(REPO / "experiments/data/prompts.jsonl", args.prompts)
    chat_prompts = prompts_of(REPO / "experiments/data/prompts.jsonl", args.chats, skip=args.prompts)

    def feedback():
        server = Server(run / "sft", db, api_key)
        try:
            return asyncio.run(collect_feedback(server, api_key, people, train_prompts, chat_prompts))
        finally:
            server.stop()

    counts = step("feedback", feedback)
    print(f"feedback collected: {counts}", flush=True)
    step("H, S, PPO", lambda: rlhf_ray("pipeline", *common))
    study = "ppo_vs_sft"
    step("study create", lambda: rlhf_ray(
        "study", "create", study, "--a", str(run), "--b", str(run / "sft"), "--prompts",
        str(REPO / "experiments/data/prompts_heldout.jsonl"), "--num-prompts", str(args.study_prompts),
        "--max-new-tokens", "10", "--temperature", "1.0", "--db", str(db)))

    def judged():
        server = Server(run / "policy", db, api_key)  # the new version is served; people judge the study
        try:
            return asyncio.run(judge_study(server, api_key, people, study))
        finally:
            server.stop()

    judgements = step("study", judged)
    step("eval", lambda: rlhf_ray("eval", str(run), "--study", str(db), study, "--judge",
                                  "envs.builtin:sentiment_reward"))
    h = json.loads((run / "reward_model" / "summary.json").read_text())
    s = json.loads((run / "satisfaction_model" / "summary.json").read_text())
    report = json.loads((run / "eval" / "eval.json").read_text())
    human = report["human"]
    rows = [
        ("people's labels (served queue), chat ratings, chat likes",
         f"{counts['labels']}, {counts['chat_ratings']}, {counts['chat_likes']}"),
        ("H: pairs (train/held-out), held-out accuracy before -> after",
         f"{h['train_pairs']}/{h['eval_pairs']}, {h['eval_accuracy_before']:.3f} -> {h['eval_accuracy_after']:.3f}"),
        ("S: ratings (train/held-out), held-out MSE before -> after (mean baseline)",
         f"{s['train_records']}/{s['eval_records']}, {s['eval_mse_before']:.4f} -> {s['eval_mse_after']:.4f} "
         f"({s['eval_mse_of_mean']:.4f})"),
        ("PPO held-out reward R, policy vs SFT", f"{report['policy']['reward']:+.3f} vs {report['reference']['reward']:+.3f}"),
        ("PPO held-out KL to SFT (nats)", f"{report['kl']:.3f}"),
        ("win rate vs SFT, judged by the sentiment score", f"{report['win_rate']:.3f}"),
        (f"human win rate vs SFT ({judgements} blind judgements, ties 1/2)",
         f"{human['win_rate']['rate']:.3f} [{human['win_rate']['low']:.3f}, {human['win_rate']['high']:.3f}]"),
        ("Cohen's kappa per pair of people", ", ".join(
            f"{'&'.join(g['annotators'])} {g['kappa']:.2f}" if g["kappa"] is not None else "undefined"
            for g in human["agreement"])),
    ]
    width = max(len(label) for label, _ in rows)
    print("\n| measure | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label:<{width}} | {value} |")
    print("\nminutes per step: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items())
          + f"; total {(time.perf_counter() - started) / 60:.1f}")


if __name__ == "__main__":
    main()
