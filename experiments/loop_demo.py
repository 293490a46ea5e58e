"""`rlhf-ray loop` driven end to end on a 2-core CPU: simulated people use the served policy over HTTP (answer
pairs they label, chats they rate or like) while the loop trains, evaluates, gates and deploys the next
version from what they gave, round after round.

    python experiments/loop_demo.py [--out runs] [--rounds 2]
    python experiments/loop_demo.py --config experiments/loop_smollm2.yaml --rounds 1 --chat \
        --prompts experiments/data/tasks/start_word_train.jsonl --score envs.tasks:start_word_reward --ask 24

The loop is --config (default experiments/loop.yaml, whose start policy, the SFT stage of
experiments/pipeline_feedback.yaml, is made first if missing). The people (rlhf_ray.simulated_users) judge
by --score plus their own noise, and keep giving feedback and judging each round's blind study until the
last round ends; every request they make must succeed, deploys included. The table is read from the version
records the loop wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rlhf_ray.config import load_config  # noqa: E402
from rlhf_ray.loop.run import run_loop  # noqa: E402
from rlhf_ray.loop.versions import list_versions, served  # noqa: E402
from rlhf_ray.serve.feedback_store import FeedbackStore  # noqa: E402
from rlhf_ray.simulated_users import Population, make_people  # noqa: E402

PEOPLE = {"alice": 0.05, "bob": 0.10, "carol": 0.15}


def prompts(path: Path, count: int, start: int) -> list[str]:
    import json

    lines = path.read_text().splitlines()
    return [json.loads(lines[(start + i) % len(lines)])["prompt"] for i in range(count)]


async def give_feedback(base_url: str, people, finished: threading.Event, args) -> dict:
    """Rounds of use until the loop has finished: `ask` questions answered twice and labelled, half as many
    chats rated or liked, and any blind study a round's gate waits for judged."""
    totals = {"requests": 0, "labels": 0, "ratings": 0, "likes": 0, "judgements": 0}
    start, path = 0, REPO / args.prompts
    async with Population(base_url, people, concurrency=8) as population:
        while not finished.is_set():
            await population.ask(prompts(path, args.ask, start), n=2, max_tokens=args.max_tokens, seed=start,
                                 chat=args.chat)
            totals["labels"] += await population.label("served", rate=0.5)
            chats = await population.chat(prompts(path, args.ask // 2, start + args.ask), max_tokens=args.max_tokens)
            totals["ratings"] += chats["ratings"]
            totals["likes"] += chats["likes"]
            totals["judgements"] += await population.judge_open_studies()  # a round's blind study (loop.gate.human)
            start += args.ask + args.ask // 2
            await asyncio.sleep(args.pause)
        totals["requests"] = population.requests
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="experiments/loop.yaml")
    parser.add_argument("--prompts", default="experiments/data/prompts.jsonl", help="what the people ask")
    parser.add_argument("--score", default="envs.builtin:sentiment_reward", help="how the people judge")
    parser.add_argument("--chat", action="store_true", help="ask through chat completions (instruct models)")
    parser.add_argument("--ask", type=int, default=40, help="questions per batch of use")
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between batches of use (lighter load)")
    parser.add_argument("--noise", type=float, default=None, help="every person's noise (default 0.05, 0.10, 0.15)")
    parser.add_argument("--tie-margin", type=float, default=0.02, help="worths this close are a tie")
    args = parser.parse_args()
    began = time.perf_counter()
    out = Path(args.out).resolve()
    sft = out / "pipeline_feedback" / "sft"
    needs_sft = args.config == "experiments/loop.yaml"
    if needs_sft and not (sft / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "pipeline", "experiments/pipeline_feedback.yaml",
                        f"output_dir={out}", "--stages", "sft"], cwd=REPO, check=True)
    db = out / "loop_feedback.db"
    store = FeedbackStore(db)
    keys = {name: store.add_annotator(name) for name in PEOPLE}  # a fresh database each run (run with a new --out)
    store.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = [f"output_dir={out}", f"reward_model.feedback_db={db}", f"loop.feedback_db={db}",
                 f"loop.port={port}", f"loop.rounds={args.rounds}"]
    if needs_sft:
        overrides += [f"model.policy={sft}", f"reward_model.base={sft}", f"satisfaction_model.base={sft}",
                      f"satisfaction_model.feedback_db={db}"]
    config = load_config(REPO / args.config, overrides)
    run_dir, finished, outcome = Path(config.run_dir), threading.Event(), {}

    def loop() -> None:
        try:
            outcome["versions"] = run_loop(config)
        finally:
            finished.set()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    while served(run_dir) is None and not finished.is_set():
        time.sleep(0.5)
    noise = PEOPLE if args.noise is None else dict.fromkeys(PEOPLE, args.noise)
    totals = asyncio.run(give_feedback(f"http://127.0.0.1:{port}", make_people(
        args.score, noise, keys, seed=0, tie_margin=args.tie_margin), finished, args))
    thread.join()
    if "versions" not in outcome:
        sys.exit("the loop failed (see above)")
    print(f"\npeople: {totals['requests']} requests, none failed; {totals['labels']} labels, "
          f"{totals['ratings']} chat ratings, {totals['likes']} likes, {totals['judgements']} blind-study judgements")
    print("\n| version | parent | feedback used (records + labels) | held-out sentiment | win rate vs parent "
          "| people's win rate | KL to parent | decision | round minutes |\n|---|---|---|---|---|---|---|---|---|")
    for v in list_versions(run_dir):
        evaluation, feedback = v.get("eval") or {}, v.get("feedback") or {}
        minutes = f"{(v['finished'] - v['created']) / 60:.1f}" if "finished" in v else "-"
        score, win, kl = ((f"{evaluation['score']:+.3f}", f"{evaluation['win_rate']:.3f}", f"{evaluation['kl']:.2f}")
                          if evaluation else ("-", "-", "-"))
        people = (v.get("human") or {}).get("win_rate")
        people = (f"{people['rate']:.3f} [{people['low']:.2f}, {people['high']:.2f}]" if people else "-")
        print(f"| {v['id']} | {v.get('parent') or '-'} | {feedback.get('records', 0)} + {feedback.get('labels', 0)} "
              f"| {score} | {win} | {people} | {kl} | {v['decision']} | {minutes} |")
    first = next((v for v in list_versions(run_dir) if v.get("eval")), None)
    if first is not None:
        print(f"\nv0000 (the start) scores {first['eval']['served_score']:+.3f} on the same held-out prompts; "
              f"serving {served(run_dir)['id']}; total {(time.perf_counter() - began) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
