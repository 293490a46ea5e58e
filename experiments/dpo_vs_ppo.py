"""DPO against reward model + PPO from the same SFT model, judged by a reward model that neither trained on.

    python experiments/dpo_vs_ppo.py                    # toy data, tiny GPT-2: minutes on 2 cores
    python experiments/dpo_vs_ppo.py --setup smollm2    # SmolLM2-135M-Instruct, assistant data: 45 minutes

Each step is the `rlhf-ray` command a user would type, timed, all in one run folder:

1. SFT: `rlhf-ray pipeline PPO_CONFIG --stages sft`.
2. RM + PPO: `--stages reward_model,ppo`, the reward model on the first `pairs` preference pairs.
3. DPO: `rlhf-ray pipeline DPO_CONFIG` in the same run folder (its SFT is the one step 1 made, skipped as
   complete), on the same first `pairs` pairs.
4. The judge: a reward model of the same base trained on the pairs after those (`reward_model.data.skip`),
   in a run folder of its own. PPO never saw it, so it does not favour PPO; its held-out pair accuracy
   says how far to trust it.
5. `rlhf-ray eval` of each policy against the SFT model on the held-out prompts, `--judge` the judge.
   The toy setup is judged a second time by the score its pairs were made from
   (`envs.builtin:sentiment_reward`).

The table: minutes of each path (SFT counted once, apart), the judge's mean score, the win rate against
the SFT model, DPO against PPO head to head (same prompts and sampling seeds), and the KL to the SFT model.
`--out` keeps every run folder; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchlib import progress, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    ppo_config: str  # SFT -> reward model -> PPO
    dpo_config: str  # the same SFT section, then DPO from "{run}/sft"
    pairs: int  # the reward model and DPO train on the first `pairs` pairs; the judge on the rest
    prompts: str  # held-out prompts of the evaluation
    true_judge: str | None = None  # the score the pairs were made from, when there is one


SETUPS = {
    "toy": Setup("experiments/pipeline.yaml", "experiments/pipeline_dpo.yaml", 200,
                 "experiments/data/prompts_heldout.jsonl", "envs.builtin:sentiment_reward"),
    "smollm2": Setup("experiments/smollm2_assistant.yaml", "experiments/smollm2_assistant_dpo.yaml", 120,
                     "experiments/data/assistant_prompts_heldout.jsonl"),
}


def rlhf_ray(*args: str, log: Path) -> float:
    """Run `rlhf-ray ARGS` (its output appended to `log`); the minutes it took. A failure stops the script."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ rlhf-ray {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=3 * 3600).returncode
    if code != 0:
        sys.exit(f"rlhf-ray {' '.join(args)} failed (exit {code}); its output is in {log}")
    return (time.perf_counter() - start) / 60


def evaluate(policy: Path, run: list[str], sft: Path, judge: str, prompts: str, out: Path, log: Path) -> dict:
    rlhf_ray("eval", str(policy), "--config", run[0], *run[1:], "--reference", str(sft), "--judge", judge,
             "--prompts", prompts, "--out", str(out), log=log)
    return json.loads((out / "eval.json").read_text())


def judged(result: dict) -> np.ndarray:
    return np.array([sample["policy_judge"] for sample in result["samples"]])


def head_to_head(first: dict, second: dict) -> float:
    """Share of prompts where the judge prefers `first`'s response to `second`'s (ties 1/2): the two evals
    sampled the same prompts with the same seeds."""
    assert [s["prompt"] for s in first["samples"]] == [s["prompt"] for s in second["samples"]]
    return float(np.mean((np.sign(judged(first) - judged(second)) + 1) / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="toy")
    parser.add_argument("--out", default=None, help="folder of the run folders (default: a new temporary one)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    setup = SETUPS[args.setup]
    if args.out is None:
        import tempfile
        args.out = tempfile.mkdtemp(prefix="dpo_vs_ppo_")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log, start = out / "commands.log", time.perf_counter()
    name = f"{args.setup}_side_by_side"
    run_dir, judge_dir = out / name, out / f"{name}_judge"
    where = [f"name={name}", f"output_dir={out}"]
    ppo = [setup.ppo_config, *where]
    progress(f"{args.setup}: every command's output goes to {log}", start)

    minutes = {"sft": rlhf_ray("pipeline", *ppo, f"reward_model.data.limit={setup.pairs}", "--stages", "sft",
                               log=log)}
    progress(f"SFT done in {minutes['sft']:.1f} min", start)
    minutes["ppo"] = rlhf_ray("pipeline", *ppo, f"reward_model.data.limit={setup.pairs}",
                              "--stages", "reward_model,ppo", log=log)
    progress(f"RM + PPO done in {minutes['ppo']:.1f} min", start)
    minutes["dpo"] = rlhf_ray("pipeline", setup.dpo_config, *where, f"dpo.data.limit={setup.pairs}", log=log)
    progress(f"DPO done in {minutes['dpo']:.1f} min", start)
    minutes["judge"] = rlhf_ray("pipeline", setup.ppo_config, f"name={judge_dir.name}", f"output_dir={out}",
                                f"reward_model.data.skip={setup.pairs}", "--stages", "reward_model", log=log)
    judge_summary = json.loads((judge_dir / "reward_model" / "summary.json").read_text())
    progress(f"judge RM done in {minutes['judge']:.1f} min, held-out pair accuracy "
             f"{judge_summary['eval_accuracy_after']:.2f}", start)

    judges = {"judge RM": str(judge_dir / "reward_model")}
    if setup.true_judge:
        judges[setup.true_judge] = setup.true_judge
    results = {}
    for judge_name, judge in judges.items():
        for path, policy in (("RM + PPO", run_dir / "policy"), ("DPO", run_dir / "dpo")):
            folder = out / "eval" / f"{path.replace(' + ', '_')}_{judge_name.split(':')[-1].replace(' ', '_')}"
            results[judge_name, path] = evaluate(policy, ppo, run_dir / "sft", judge, setup.prompts, folder, log)
        progress(f"evaluated both by {judge_name}", start)

    dpo_summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    rows, figures = [], {"setup": args.setup, "pairs": setup.pairs, "minutes": minutes,
                         "judge_heldout_accuracy": judge_summary["eval_accuracy_after"],
                         "dpo_heldout_accuracy": dpo_summary["eval_accuracy_after"], "results": {}}
    for judge_name in judges:
        ppo_result, dpo_result = results[judge_name, "RM + PPO"], results[judge_name, "DPO"]
        for path, result, other in (("RM + PPO", ppo_result, dpo_result), ("DPO", dpo_result, ppo_result)):
            sft_score = float(np.mean([s["reference_judge"] for s in result["samples"]]))
            row = {"judge": judge_name, "path": path, "minutes": minutes["ppo" if path == "RM + PPO" else "dpo"],
                   "judge_score": float(judged(result).mean()), "sft_judge_score": sft_score,
                   "win_rate_vs_sft": result["win_rate"], "win_rate_vs_other": head_to_head(result, other),
                   "kl": result["kl"], "prompts": result["num_prompts"]}
            rows.append(row)
            figures["results"][f"{judge_name} / {path}"] = row

    print(f"\n{args.setup}: SFT {minutes['sft']:.1f} min (shared); judge RM {minutes['judge']:.1f} min, held-out "
          f"pair accuracy {judge_summary['eval_accuracy_after']:.2f}; {rows[0]['prompts']} held-out prompts")
    header = ("judge", "path", "minutes", "judge score (SFT)", "win vs SFT", "win vs other", "KL to SFT")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print(f"| {row['judge']} | {row['path']} | {row['minutes']:.1f} | {row['judge_score']:+.3f} "
              f"({row['sft_judge_score']:+.3f}) | {row['win_rate_vs_sft']:.2f} | {row['win_rate_vs_other']:.2f} | "
              f"{row['kl']:.2f} |")
    print(f"run folders: {out}")
    if args.json:
        write_json(Path(args.json), figures)


if __name__ == "__main__":
    main()
