"""Peer benchmark: the DPO stage of `rlhf-ray pipeline` against TRL's `DPOTrainer`, one after the other.

    python experiments/bench_dpo_trl.py                     # tiny GPT-2, the toy pairs
    python experiments/bench_dpo_trl.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data experiments/data/assistant_preferences.jsonl --pairs 48 --batch-size 8 --max-length 192 --lr 5e-6

TRL is an optional extra (`pip install -e ".[bench]"`), never a dependency of rlhf-ray.

Both sides get, from one set of options:
- the model: the same local folder (`rlhf_ray.models.resolve_model_path`), trained in full, float32, on CPU;
- the first `--pairs` pairs of `--data`, the prompt formatted as `rlhf-ray` formats it (the tokenizer's chat
  template where it has one, as text), the responses as they are with the end-of-sequence token after them
  (TRL adds its EOS text; rlhf-ray its id); all of them trained on (rlhf-ray `dpo.eval_fraction=0`);
- the sigmoid DPO loss with `--beta`, the reference's log-probs computed once before training (TRL
  `precompute_ref_log_probs=True`), `--epochs` over the pairs in batches of `--batch-size` pairs, one optimizer
  step each with no gradient accumulation, `--max-length` tokens per sequence (the table says how many pairs
  rlhf-ray had to cut: 0 means neither side cut);
- AdamW (fused), constant learning rate `--lr`, eps 1e-5, no weight decay, gradient norm clipped at 1, dropout
  off, seed 0;
- the same `--threads` cores (pinned where the machine has more) and torch threads, one process each (rlhf-ray:
  its one learner rank in Ray Train).

Measured per side: tokens per second of training, the mean tokens of a step (prompt + chosen + prompt +
rejected, padding not counted, from each side's own tokenization) over its median step time after the first
(rlhf-ray's `perf/step_s`; TRL's time between the ends of successive optimizer steps, by a
`TrainerCallback`), and the whole command from outside (imports, Ray, model loading, the reference pass,
training, the save). Also each side's mean loss over the last epoch: the same pairs and settings should learn
alike. Goal (the issue's): tokens/s >= TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import progress, write_json
from peer_sides import clean_env, run_side

TINY = "rlhf-ray/tiny-gpt2"


def trl_worker(spec_path: Path) -> int:
    """The TRL side, in its own process: DPOTrainer with the spec's settings; step times, tokens and logs."""
    spec = json.loads(spec_path.read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    out = Path(spec["out_dir"])
    record = {"step_end": [], "logs": []}

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["step_end"].append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            record["logs"].append({"step": state.global_step, **(logs or {})})

    config = DPOConfig(
        output_dir=str(out / "trainer"), num_train_epochs=spec["epochs"], seed=0, use_cpu=True, bf16=False,
        fp16=False, model_init_kwargs={"dtype": "float32"}, gradient_checkpointing=False,
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        precompute_ref_log_probs=True, precompute_ref_batch_size=spec["batch_size"], loss_type=["sigmoid"],
        beta=spec["beta"], max_length=spec["max_length"], truncation_mode="keep_end", learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", adam_epsilon=1e-5,
        weight_decay=0.0, max_grad_norm=1.0, disable_dropout=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    trainer = DPOTrainer(model=spec["model_path"], args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(spec["pairs"]), callbacks=[StepTimes()])
    data = trainer.train_dataset
    record["tokens"] = sum(2 * len(p) + len(c) + len(r)
                           for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    trainer.train()
    trainer.save_model(str(out / "final"))
    record["torch_threads"] = torch.get_num_threads()
    (out / "trl_record.json").write_text(json.dumps(record))
    return 0


def load_pairs(args, model_path: Path) -> list[dict]:
    """The first `--pairs` pairs, the prompt formatted as rlhf-ray formats it for this tokenizer."""
    from rlhf_ray.data import DatasetConfig
    from rlhf_ray.models import load_tokenizer

    records = DatasetConfig(path=str(args.data), limit=args.pairs).load_preferences(load_tokenizer(model_path))
    if len(records) < args.pairs or args.pairs % args.batch_size:
        raise SystemExit(f"--pairs must be a multiple of --batch-size and at most the {len(records)} pairs of "
                         f"{args.data}")
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]


def rlhf_ray_config(args, model_path: Path, workdir: Path) -> dict:
    return {"name": "dpo_trl", "output_dir": str(workdir / "rlhf_ray"), "seed": 0,
            "dpo": {"base": str(model_path), "data": {"path": str(args.data.resolve()), "limit": args.pairs},
                    "loss_type": "dpo", "beta": args.beta, "epochs": args.epochs, "lr": args.lr,
                    "batch_size": args.batch_size, "max_length": args.max_length, "eval_fraction": 0.0},
            "learner": {"num_workers": 1, "cpus_per_worker": args.threads, "torch_threads": args.threads,
                        "adam_eps": 1e-5, "max_grad_norm": 1.0, "weight_decay": 0.0}}


def side_figures(steps: int, later_step_s: list[float], tokens: float, losses: list[float], command_s: float) -> dict:
    """A side's figures from its step count, the times of its steps after the first, its tokens in all."""
    steady = statistics.median(later_step_s)
    per_step = tokens / steps
    return {"steps": steps, "tokens_per_step": per_step, "median_step_s": steady,
            "tokens_per_s": per_step / steady, "last_epoch_loss": statistics.fmean(losses), "command_s": command_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--data", type=Path, default=Path("experiments/data/preferences.jsonl"))
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workdir", type=Path, default=None, help="keep both runs here (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="stream both sides' output to stderr")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker is not None:
        return trl_worker(args.trl_worker)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    since = time.perf_counter()
    try:
        import trl
    except ImportError:
        print('TRL is not installed: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    import yaml

    from rlhf_ray.models import resolve_model_path

    model_path = resolve_model_path(args.model)
    pairs = load_pairs(args, model_path)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dpo_trl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    available = sorted(os.sched_getaffinity(0))
    cores = available[:args.threads] if args.threads < len(available) else None
    progress(f"{args.model}: {len(pairs)} pairs of {args.data}, {args.epochs} epochs of batches of "
             f"{args.batch_size}; {args.threads} cores and torch threads a side; in {workdir}", since)

    config_path = workdir / "rlhf_ray.yaml"
    config_path.write_text(yaml.safe_dump(rlhf_ray_config(args, model_path, workdir), sort_keys=False, width=1000))
    command = [sys.executable, "-m", "rlhf_ray.cli", "pipeline", str(config_path)]
    progress(f"rlhf-ray: $ {' '.join(command)}", since)
    ours = run_side("rlhf-ray", command, clean_env(None), cores, workdir / "rlhf_ray.log", args.verbose)
    if ours["returncode"] != 0:
        sys.exit(f"rlhf-ray failed (exit {ours['returncode']}); log {ours['log']}:\n" + "\n".join(ours["tail"]))
    stage = workdir / "rlhf_ray" / "dpo_trl" / "dpo"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_s" in r]
    cut = json.loads((stage / "summary.json").read_text())["cut_pairs"]
    figures = {"rlhf_ray": side_figures(len(steps), [r["perf/step_s"] for r in steps[1:]],
                                        sum(r["perf/step_s"] * r["perf/tokens_per_s"] for r in steps),
                                        [r["dpo/loss"] for r in steps if r["epoch"] == args.epochs], ours["seconds"])}
    progress(f"rlhf-ray: done in {ours['seconds']:.1f} s", since)

    out = workdir / "trl"
    out.mkdir(exist_ok=True)
    spec = {"model_path": str(model_path), "pairs": pairs, "epochs": args.epochs, "batch_size": args.batch_size,
            "beta": args.beta, "lr": args.lr, "max_length": args.max_length, "threads": args.threads,
            "out_dir": str(out)}
    (workdir / "trl_spec.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(workdir / "trl_spec.json")]
    progress(f"TRL {trl.__version__}: $ {' '.join(command)}", since)
    theirs = run_side("trl", command, clean_env(args.threads), cores, workdir / "trl.log", args.verbose)
    if theirs["returncode"] != 0:
        sys.exit(f"TRL failed (exit {theirs['returncode']}); log {theirs['log']}:\n" + "\n".join(theirs["tail"]))
    record = json.loads((out / "trl_record.json").read_text())
    ends = record["step_end"]
    per_epoch = len(ends) // args.epochs
    losses = [log["loss"] for log in record["logs"] if "loss" in log and log["step"] > len(ends) - per_epoch]
    figures["trl"] = side_figures(len(ends), [b - a for a, b in zip(ends, ends[1:])],
                                  record["tokens"] * args.epochs, losses, theirs["seconds"])
    progress(f"TRL: done in {theirs['seconds']:.1f} s", since)

    ratio = figures["rlhf_ray"]["tokens_per_s"] / figures["trl"]["tokens_per_s"]
    print(f"\n{args.model}: {len(pairs)} pairs x {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.threads} threads; pairs rlhf-ray cut to --max-length {args.max_length}: {cut}")
    print("| side | steps | tokens/step | median step s | tokens/s | last-epoch loss | whole command s |")
    print("|---|---|---|---|---|---|---|")
    for name, side in (("rlhf-ray", figures["rlhf_ray"]), (f"TRL {trl.__version__}", figures["trl"])):
        print(f"| {name} | {side['steps']} | {side['tokens_per_step']:.0f} | {side['median_step_s']:.3f} | "
              f"{side['tokens_per_s']:.0f} | {side['last_epoch_loss']:.4f} | {side['command_s']:.1f} |")
    print(f"tokens/s: rlhf-ray {ratio:.2f}x TRL (goal >= 1.0)")
    figures.update({"model": args.model, "pairs": len(pairs), "epochs": args.epochs, "batch_size": args.batch_size,
                    "threads": args.threads, "cut_pairs": cut, "tokens_per_s_ratio": ratio,
                    "trl_version": trl.__version__})
    if args.json:
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
