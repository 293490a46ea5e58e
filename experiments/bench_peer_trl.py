"""Peer benchmark: TRL's `GRPOTrainer` and `rlhf-ray train` on the same GRPO run, one after the other.

    python experiments/bench_peer_trl.py [--steps 10] [--prompts-per-step 8] [--group-size 8] [--max-new-tokens 16]
        [--threads 2] [--loss-type dapo] [--json PATH] [rlhf-ray key=value ...]
    python experiments/bench_peer_trl.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 4 \\
        --prompts-per-step 8 --group-size 4 --max-new-tokens 32

TRL is an optional extra (`pip install -e ".[bench]"`), never a dependency of rlhf-ray.

Both sides get, from one set of options:
- the model: the same local folder (`rlhf_ray.models.resolve_model_path`; the tiny GPT-2 is built locally,
  SmolLM2-135M-Instruct is resolved offline), trained in full (every parameter), float32, on CPU;
- the prompts, in the same order, cycled (TRL `shuffle_dataset=False`), as the same text: the toy prompts of
  `envs.builtin` for the tiny model, else `--prompt-file` formatted by the model's chat template the way
  `rlhf-ray` formats a prompt dataset; the list is cut to a multiple of the prompts per step;
- the reward (`--reward module:function`, default the toy `envs.builtin:sentiment_reward`), given the decoded
  completions (special tokens skipped) on both sides;
- GRPO: `--group-size` completions per prompt (TRL `num_generations`, rlhf-ray `ppo.group_size`), advantages
  (r - group mean) / group std (TRL `scale_rewards="group"`, rlhf-ray `ppo.advantage_estimator=grpo` with
  `ppo.whiten_advantages=false`), clip 0.2, no KL term (TRL `beta=0`, rlhf-ray `ppo.kl.coef=0`,
  `ppo.kl.in_reward=false`), no entropy bonus;
- one optimizer step per iteration on all of its completions, used once (TRL `per_device_train_batch_size` =
  prompts x group, gradient accumulation 1, `num_iterations=1`; rlhf-ray `ppo.epochs=1`,
  `ppo.minibatch_size` = prompts x group);
- loss aggregation `--loss-type` (TRL's name) and its rlhf-ray `ppo.loss_aggregation` (LOSS_TYPES);
- `max_completion_length` = `rollout.max_new_tokens`, temperature, no top-k/top-p;
- AdamW (fused), constant learning rate, eps 1e-5, no weight decay, gradient norm clipped at 1, seed 0;
- the cores and threads: each side runs as its own process pinned to the same `--threads` cores (where the
  machine has more). TRL runs in one process with `--threads` torch threads (and OMP_NUM_THREADS); rlhf-ray's
  one learner rank and its one rollout worker (1 Ray CPU each) run `--threads` torch threads each
  (`learner.torch_threads`, `rollout.torch_threads`): generation and training take turns on the same cores
  on both sides, neither overlaps them.

Measured from outside, per side: the whole command (process start to exit: imports, Ray, model loading,
training, the final save), and from inside: seconds per iteration (rlhf-ray's `perf/iteration_s`; TRL's time
between the ends of successive optimizer steps, by a `TrainerCallback`), median after the first iteration,
and the reward after the last step (the batch's mean: rlhf-ray's `rollout/reward_mean`, TRL's logged
`reward`). Batch rewards are noisy, so both final models (and the initial one) are also scored the same way
on held-out prompts: `--eval-samples` sampled completions per prompt at the training temperature, and the
greedy one, by the same reward. The reward goal is judged on that held-out sampled mean: rlhf-ray not lower
than TRL by more than two standard errors of the difference.

Also printed, to show where the time goes: the median split of an iteration on each side (rlhf-ray's perf/*
fields; TRL's generation + scoring and training step, timed around its methods) and rlhf-ray's timeline from
the command's start (preflight, local Ray, the learner's worker group, models loaded, iterations, exit), from
the moment each line of its output arrived. Each side's output is in `<workdir>/<side>.log`, each line stamped.

Goals (the issue's): seconds per iteration <= 0.5 x TRL's, whole command <= 1.0 x TRL's, reward not lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import progress, write_json  # experiments/benchlib.py
from peer_sides import clean_env, heldout_reward, import_function, run_side, trl_worker  # experiments/peer_sides.py

ROOT = Path(__file__).resolve().parents[1]
TINY = "rlhf-ray/tiny-gpt2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

# TRL's loss_type -> rlhf-ray's ppo.loss_aggregation (with one optimizer step over all completions, no
# gradient accumulation, TRL's "dapo" and "bnpo" are both the token mean over the batch)
LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
              "dr_grpo": "seq-mean-token-sum-norm"}

# Held-out openings for the tiny model: words of rlhf_ray.models.tiny.VOCABULARY, none of them a training prompt
TINY_HELDOUT = ["the team is", "the city was", "the food is", "my music is", "our day was", "this food was",
                "the book was so", "i think the day is", "today the music is", "it is a", "my team was very",
                "this weather is"]


# ------------------------------------------------------------------------------------------------ rlhf-ray side


def rlhf_ray_config(args, model_path: Path, prompts: list[str], workdir: Path) -> dict:
    """The run config (YAML) of the rlhf-ray side: the same settings as the TRL side's GRPOConfig."""
    episodes = args.prompts_per_step * args.group_size
    return {
        "name": "peer_trl", "seed": args.seed, "output_dir": str(workdir / "rlhf_ray"),
        "model": {"policy": str(model_path), "dtype": "float32"},
        "data": {"prompts": prompts},
        "rollout": {"batch_size": args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
                    "sampling": {"temperature": args.temperature, "top_k": 0, "top_p": 1.0},
                    "workers": {"min": 1, "max": 1}, "num_cpus": 1, "torch_threads": args.threads},
        "reward": {"function": args.reward},
        "ppo": {"advantage_estimator": "grpo", "group_size": args.group_size, "epochs": 1,
                "minibatch_size": episodes, "loss_aggregation": LOSS_TYPES[args.loss_type],
                "whiten_advantages": False, "clip_eps": 0.2, "entropy_coef": 0.0,
                "kl": {"coef": 0.0, "in_reward": False}},
        "learner": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": args.threads, "lr": args.lr,
                    "adam_eps": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0, "fused_optimizer": True,
                    "gradient_checkpointing": False},
        "train": {"iterations": args.steps, "checkpoint_every": args.steps},
    }


# --------------------------------------------------------------------------------------------------------- main


def load_prompts(args, model_path: Path) -> tuple[list[str], list[str]]:
    """Training and held-out prompt texts, formatted as rlhf-ray formats them."""
    from rlhf_ray.data.config import DatasetConfig
    from rlhf_ray.models import load_tokenizer

    if args.prompt_file is None and args.model == TINY:
        from envs.builtin import BUILTIN_PROMPTS

        assert not set(TINY_HELDOUT) & set(BUILTIN_PROMPTS)
        train, heldout = list(BUILTIN_PROMPTS), list(TINY_HELDOUT)
    else:
        tokenizer = load_tokenizer(model_path)
        prompt_file = args.prompt_file or str(ROOT / "experiments/data/assistant_prompts.jsonl")
        heldout_file = args.heldout_file or str(ROOT / "experiments/data/assistant_prompts_heldout.jsonl")
        train = [r.prompt for r in DatasetConfig(path=prompt_file).load_prompts(tokenizer)]
        heldout = [r.prompt for r in DatasetConfig(path=heldout_file).load_prompts(tokenizer)]
    usable = len(train) // args.prompts_per_step * args.prompts_per_step
    if usable == 0:
        raise SystemExit(f"{len(train)} prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    return train[:usable], heldout[:args.heldout_prompts]


def median_after_first(values: list[float]) -> float | None:
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=TINY, help=f"model name or folder (default {TINY}; or {SMOLLM2})")
    parser.add_argument("--prompt-file", default=None,
                        help="training prompts (JSONL with 'prompt'); default: the toy prompts for the tiny model, "
                             "experiments/data/assistant_prompts.jsonl otherwise")
    parser.add_argument("--heldout-file", default=None,
                        help="held-out prompts; default: a built-in list for the tiny model, "
                             "experiments/data/assistant_prompts_heldout.jsonl otherwise")
    parser.add_argument("--heldout-prompts", type=int, default=16, help="held-out prompts scored, at most")
    parser.add_argument("--eval-samples", type=int, default=8, help="sampled completions per held-out prompt")
    parser.add_argument("--reward", default="envs.builtin:sentiment_reward", help="module:function(prompts, responses)")
    parser.add_argument("--steps", type=int, default=10, help="iterations (optimizer steps) on each side")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="default 5e-4 for the tiny model, 1e-5 otherwise")
    parser.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="dapo",
                        help="TRL's loss_type; rlhf-ray gets the matching ppo.loss_aggregation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="cores and torch threads of each side (default: 2, or fewer if the machine has fewer)")
    parser.add_argument("--only", choices=("rlhf_ray", "trl"), default=None, help="run one side only (debugging)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep both runs here (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="stream both sides' output to stderr")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="rlhf-ray config overrides (e.g. learner.micro_batch_tokens=512); keep the shared "
                             "settings shared")
    args = parser.parse_args(argv)
    if args.trl_worker is not None:
        return trl_worker(args.trl_worker)
    # stopped from outside (bench_all's --timeout, `timeout`): unwind, so that run_side stops the running side
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.lr is None:
        args.lr = 5e-4 if args.model == TINY else 1e-5
    since = time.perf_counter()
    try:
        import trl
    except ImportError:
        print('TRL is not installed: pip install -e ".[bench]"', file=sys.stderr)
        return 2

    import yaml

    from rlhf_ray.models import resolve_model_path

    model_path = resolve_model_path(args.model)  # built (tiny) or converted (SmolLM2) here, before either side
    prompts, heldout = load_prompts(args, model_path)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_peer_trl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    available = sorted(os.sched_getaffinity(0))
    cores = available[:args.threads] if args.threads < len(available) else None
    threads_note = (f"{args.threads} cores{' (pinned)' if cores else ''}; TRL: 1 process, {args.threads} torch "
                    f"threads; rlhf-ray: learner and 1 rollout worker, {args.threads} torch threads each, taking turns")
    progress(f"{args.model}: {len(prompts)} training prompts, {len(heldout)} held out; {threads_note}; in {workdir}",
             since)

    sides: dict[str, dict] = {}
    if args.only in (None, "rlhf_ray"):
        config = rlhf_ray_config(args, model_path, prompts, workdir)
        config_path = workdir / "rlhf_ray.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000))
        command = [sys.executable, "-m", "rlhf_ray.cli", "train", str(config_path), *args.overrides]
        run_dir = workdir / "rlhf_ray" / "peer_trl"
        progress(f"rlhf-ray: $ {' '.join(command)}", since)
        result = run_side("rlhf-ray", command, clean_env(None), cores, workdir / "rlhf_ray.log", args.verbose,
                          watch=run_dir / "metrics.jsonl")
        sides["rlhf_ray"] = result
        if result["returncode"] == 0:
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            result["metrics"] = rows
            result["final_model"] = str(run_dir / "policy")
            events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
            result["learner_start"] = next(e["time"] for e in events if e["event"] == "learner_start")
        progress(f"rlhf-ray: exit {result['returncode']} after {result['seconds']:.1f} s", since)

    if args.only in (None, "trl"):
        out = workdir / "trl"
        out.mkdir(exist_ok=True)
        spec = {"model_path": str(model_path), "prompts": prompts, "reward": args.reward, "steps": args.steps,
                "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "lr": args.lr,
                "loss_type": args.loss_type, "threads": args.threads, "seed": args.seed, "out_dir": str(out)}
        spec_path = workdir / "trl_spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path)]
        progress(f"TRL {trl.__version__}: $ {' '.join(command)}", since)
        result = run_side("trl", command, clean_env(args.threads), cores, workdir / "trl.log", args.verbose)
        sides["trl"] = result
        if result["returncode"] == 0:
            result["record"] = json.loads((out / "trl_record.json").read_text())
            result["final_model"] = str(out / "final")
        progress(f"TRL: exit {result['returncode']} after {result['seconds']:.1f} s", since)

    failed = [name for name, r in sides.items() if r["returncode"] != 0]
    for name in failed:
        print(f"\n{name} failed (exit {sides[name]['returncode']}; log {sides[name]['log']}):", file=sys.stderr)
        for line in sides[name]["tail"]:
            print(f"    {line}", file=sys.stderr)
    if failed:
        return 1

    # ---- figures per side
    figures: dict[str, dict] = {}
    if "rlhf_ray" in sides:
        r = sides["rlhf_ray"]
        rows = r["metrics"]
        iteration_s = [m["perf/iteration_s"] for m in rows]
        seen = r["lines_seen"]
        first_line = seen[0] if seen else r["started"] + r["seconds"]
        last_line = seen[-1] if seen else r["ended"]
        parts = {}
        for key in ("rollout_s", "generate_s", "scoring_s", "experience_s", "update_s", "sync_s"):
            parts[key] = median_after_first([m[f"perf/{key}"] for m in rows])
        parts["other_s"] = median_after_first(
            [m["perf/iteration_s"] - sum(m[f"perf/{k}"] for k in ("rollout_s", "experience_s", "update_s", "sync_s"))
             for m in rows])

        def first(marker):
            return next((t for t, line in r["timeline"] if marker in line), None)

        timeline = {"preflight passed": first("preflight passed"), "local Ray started": first("Started a local Ray"),
                    "learner worker group started": first("Started training worker group"),
                    "learner ready (models loaded)": r["learner_start"] - r["started"],
                    "iteration 1 began": first_line - iteration_s[0] - r["started"],
                    "last iteration ended": last_line - r["started"], "run folder printed": first("run folder:"),
                    "exit": r["seconds"]}
        figures["rlhf_ray"] = {
            "whole_command_s": r["seconds"], "iteration_s": median_after_first(iteration_s),
            "first_iteration_s": iteration_s[0], "iterations": iteration_s,
            "startup_s": first_line - iteration_s[0] - r["started"],
            "learner_ready_s": r["learner_start"] - r["started"],
            "after_last_iteration_s": r["ended"] - last_line,
            "reward_last": rows[-1]["rollout/reward_mean"], "rewards": [m["rollout/reward_mean"] for m in rows],
            "median_split": parts, "response_len_last": rows[-1].get("rollout/response_len"),
            "timeline": timeline, "load_average": [r["load_average_before"], r["load_average_after"]],
        }
    if "trl" in sides:
        r = sides["trl"]
        record = r["record"]
        ends = record["step_end"]
        iteration_s = [b - a for a, b in zip([record["train_begin"], *ends[:-1]], ends)]
        step_logs = [log for log in record["logs"] if "reward" in log]
        figures["trl"] = {
            "whole_command_s": r["seconds"], "iteration_s": median_after_first(iteration_s),
            "first_iteration_s": iteration_s[0], "iterations": iteration_s,
            "startup_s": record["train_begin"] - r["started"], "after_last_iteration_s": r["ended"] - ends[-1],
            "reward_last": step_logs[-1]["reward"], "rewards": [log["reward"] for log in step_logs],
            "torch_threads": record["torch_threads"], "optimizer": record["optimizer"],
            "median_split": {
                "generate_and_score_s": median_after_first(record["_generate_and_score_completions"]),
                "forward_backward_s": median_after_first([t - g for t, g in zip(
                    record["training_step"], record["_generate_and_score_completions"])]),
                "optimizer_and_other_s": median_after_first([i - t for i, t in zip(
                    iteration_s, record["training_step"])])},
            "response_len_last": step_logs[-1].get("completions/mean_length"),
            "load_average": [r["load_average_before"], r["load_average_after"]],
        }

    # ---- held-out score of the initial and the final models, the same measure for all
    import torch

    torch.set_num_threads(args.threads)
    score = import_function(args.reward)
    progress(f"held-out reward: {len(heldout)} prompts x ({args.eval_samples} sampled + greedy)", since)
    heldout_scores = {"initial": heldout_reward(model_path, model_path, heldout, score, args)}
    for name in sides:
        heldout_scores[name] = heldout_reward(Path(sides[name]["final_model"]), model_path, heldout, score, args)
        figures[name]["heldout"] = heldout_scores[name]

    # ---- the table
    def ratio(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    both = "rlhf_ray" in figures and "trl" in figures

    def get(side, key):
        return figures.get(side, {}).get(key)

    table: list[dict] = []

    def add(measure, key=None, goal="—", judge=None, values=None, show_ratio=True):
        a, b = values if values is not None else (get("rlhf_ray", key), get("trl", key))
        q = ratio(a, b) if show_ratio else None
        met = judge(a, b, q) if judge is not None and both else None
        table.append({"measure": measure, "rlhf_ray": a, "trl": b, "ratio": q, "goal": goal, "met": met})

    add("seconds per iteration (median after the first)", "iteration_s", "ratio ≤ 0.5", lambda a, b, q: q <= 0.5)
    add("whole command, s", "whole_command_s", "ratio ≤ 1.0", lambda a, b, q: q <= 1.0)
    add("  startup before iteration 1, s", "startup_s")
    add("  first iteration, s", "first_iteration_s")
    add("  after the last iteration (final save, exit), s", "after_last_iteration_s")
    add("reward after the last step (batch mean)", "reward_last", show_ratio=False)
    h = {name: heldout_scores.get(name) for name in ("rlhf_ray", "trl")}
    se = math.sqrt(sum(s["sampled_se"] ** 2 for s in h.values() if s)) if both else None
    add(f"held-out reward, {args.eval_samples} sampled x {len(heldout)} prompts "
        f"(initial model {heldout_scores['initial']['sampled_mean']:+.3f})", goal="not lower (2 s.e.)",
        judge=lambda a, b, q: a >= b - 2 * se, show_ratio=False,
        values=tuple(s["sampled_mean"] if s else None for s in h.values()))
    add(f"held-out reward, greedy (initial model {heldout_scores['initial']['greedy_mean']:+.3f})",
        show_ratio=False, values=tuple(s["greedy_mean"] if s else None for s in h.values()))
    add(f"cores and threads: {threads_note}", values=(None, None), show_ratio=False)

    import trl as trl_module
    import transformers

    settings = {"model": args.model, "model_path": str(model_path), "steps": args.steps,
                "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                "episodes_per_step": args.prompts_per_step * args.group_size, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "lr": args.lr, "loss_type": args.loss_type,
                "loss_aggregation": LOSS_TYPES[args.loss_type], "seed": args.seed, "threads": args.threads,
                "pinned_cores": cores, "reward": args.reward, "training_prompts": len(prompts),
                "heldout_prompts": len(heldout), "overrides": args.overrides}
    print(f"\nGRPO, rlhf-ray vs TRL {trl_module.__version__} GRPOTrainer: {args.model}, {args.steps} steps of "
          f"{args.prompts_per_step} prompts x {args.group_size}, ≤ {args.max_new_tokens} new tokens, lr {args.lr:g}, "
          f"loss {args.loss_type} = {LOSS_TYPES[args.loss_type]}, full parameters, float32, CPU")
    loads = "; ".join(f"{name} {f['load_average'][0]:.1f} before, {f['load_average'][1]:.1f} after"
                      for name, f in figures.items())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {os.cpu_count()} CPUs; load average "
          f"(1 min): {loads}")
    cells = [["measure", "rlhf_ray", "TRL", "ratio", "goal", "met"]]
    for t in table:
        cells.append([t["measure"], "" if t["rlhf_ray"] is None else f"{t['rlhf_ray']:.4g}",
                      "" if t["trl"] is None else f"{t['trl']:.4g}", "" if t["ratio"] is None else f"{t['ratio']:.2f}",
                      t["goal"], {True: "yes", False: "no", None: ""}[t["met"]]])
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    for i, c in enumerate(cells):
        print("| " + " | ".join(x.ljust(w) if j in (0, 4, 5) else x.rjust(w)
                                for j, (x, w) in enumerate(zip(c, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if "rlhf_ray" in figures:
        f = figures["rlhf_ray"]
        split = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in f["median_split"].items())
        print(f"rlhf-ray, median split of an iteration (s): {split}")
        print("rlhf-ray, seconds since the command started: " + ", ".join(
            f"{k} {v:.1f}" for k, v in f["timeline"].items() if v is not None))
    if "trl" in figures:
        split = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in figures["trl"]["median_split"].items())
        print(f"TRL, median split of an iteration (s): {split}")

    report = {"settings": settings, "trl_version": trl_module.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "cpus": os.cpu_count(), "threads_note": threads_note,
              "load_average_after": os.getloadavg()[0], "heldout_initial": heldout_scores["initial"],
              "commands": {name: r["command"] for name, r in sides.items()}, "workdir": str(workdir),
              "figures": figures, "table": table}
    if both:
        report.update({
            "iteration_ratio": ratio(figures["rlhf_ray"]["iteration_s"], figures["trl"]["iteration_s"]),
            "whole_command_ratio": ratio(figures["rlhf_ray"]["whole_command_s"], figures["trl"]["whole_command_s"]),
            "heldout_difference": h["rlhf_ray"]["sampled_mean"] - h["trl"]["sampled_mean"],
            "heldout_difference_se": se,
        })
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
