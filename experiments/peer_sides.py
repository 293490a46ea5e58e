"""The two sides of `bench_peer_trl.py`: TRL's GRPOTrainer in its own process (`trl_worker`), running a side's
command pinned and timed from outside (`run_side`), and scoring a trained model on held-out prompts the same way
for both (`heldout_reward`)."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def import_function(spec: str):
    """`module:function` -> the function."""
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--reward must be module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------- TRL side


def trl_worker(spec_path: Path) -> int:
    """The TRL side, in its own process: GRPOTrainer with the spec's settings; step times and logs to JSON."""
    spec = json.loads(spec_path.read_text())
    threads = spec["threads"]
    import torch

    torch.set_num_threads(threads)
    import numpy as np
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    score = import_function(spec["reward"])

    def reward(prompts, completions, **kwargs):
        return [float(x) for x in np.asarray(score(list(prompts), list(completions)), dtype=np.float64)]

    reward.__name__ = score.__name__

    out = Path(spec["out_dir"])
    record = {"step_end": [], "logs": []}

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_end"].append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            record["logs"].append({"step": state.global_step, **(logs or {})})

    episodes = spec["prompts_per_step"] * spec["group_size"]
    config = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=spec["steps"], seed=spec["seed"], use_cpu=True, bf16=False,
        fp16=False, model_init_kwargs={"dtype": "float32"}, gradient_checkpointing=False,
        per_device_train_batch_size=episodes, gradient_accumulation_steps=1, num_generations=spec["group_size"],
        num_iterations=1, shuffle_dataset=False, max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", adam_epsilon=1e-5,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type=spec["loss_type"],
        scale_rewards="group", mask_truncated_completions=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    trainer = GRPOTrainer(model=spec["model_path"], reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}), callbacks=[StepTimes()])
    # TRL's split of a step, timed around two of its methods: generation + scoring, and the whole training step
    # (which holds the generation, then the forward and backward passes); the optimizer step is outside both
    for method in ("_generate_and_score_completions", "training_step"):
        record[method] = []

        def timed_method(*a, _inner=getattr(trainer, method), _name=method, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                record[_name].append(time.perf_counter() - start)
                if _name == "training_step":
                    print(f"TRL step {len(record[_name])}: generation + scoring "
                          f"{record['_generate_and_score_completions'][-1]:.3f} s, training step "
                          f"{record[_name][-1]:.3f} s", flush=True)

        setattr(trainer, method, timed_method)
    trainer.train()
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    record["torch_threads"] = torch.get_num_threads()
    record["optimizer"] = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer).__name__
    (out / "trl_record.json").write_text(json.dumps(record))
    return 0


# ------------------------------------------------------------------------------------------------ running a side


def run_side(name: str, command: list[str], env: dict, cores: list[int] | None, log: Path, verbose: bool,
             watch: Path | None = None) -> dict:
    """Run one side's command in its own process (pinned to `cores`), timed from outside.

    `watch`: a metrics.jsonl to poll, recording when each line appears (the outside clock of the iterations).
    """
    def pin():
        if cores is not None:
            os.sched_setaffinity(0, cores)

    lines_seen: list[float] = []
    done = threading.Event()

    def poll():
        count = 0
        while not done.is_set():
            try:
                now = time.time()
                n = watch.read_text().count("\n")
                lines_seen.extend([now] * (n - count))
                count = max(count, n)
            except OSError:
                pass
            time.sleep(0.05)

    load_before = os.getloadavg()[0]
    started = time.time()
    with log.open("w", buffering=1) as out:
        # its own session: if this script is stopped, the side and all it started (Ray) are stopped with it
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", preexec_fn=pin, start_new_session=True)
        poller = threading.Thread(target=poll, daemon=True) if watch is not None else None
        if poller:
            poller.start()
        tail: list[str] = []
        timeline: list[tuple[float, str]] = []  # (seconds since the start, line): when each line came
        try:
            for line in process.stdout:
                timeline.append((time.time() - started, line.rstrip()))
                out.write(f"[{timeline[-1][0]:7.2f} s] {line}")
                if verbose:
                    sys.stderr.write(f"[{name}] {line}")
                if line.strip():
                    tail = (tail + [line.rstrip()])[-15:]
            returncode = process.wait()
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    ended = time.time()
    done.set()
    if poller:
        poller.join()
    return {"command": command, "returncode": returncode, "started": started, "ended": ended,
            "seconds": ended - started, "log": str(log), "tail": tail, "lines_seen": lines_seen, "timeline": timeline,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def clean_env(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------------- held out


def heldout_reward(model_dir: Path, tokenizer_dir: Path, prompts: list[str], score, args) -> dict:
    """Mean reward of `--eval-samples` sampled completions per held-out prompt (training temperature, fixed
    seed) and of the greedy completion, by HF `generate`; the same for every model scored."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_ray.sampling import end_of_response_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:  # the initial model's end of response, for every model scored
        generation_config = GenerationConfig.from_pretrained(tokenizer_dir)
    except OSError:
        generation_config = None
    eos = sorted(end_of_response_ids(tokenizer, generation_config)) or None
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch["input_ids"].shape[1]
    common = {"max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos}
    with torch.inference_mode():
        greedy = model.generate(**batch, do_sample=False, **common)
        torch.manual_seed(args.seed + 12345)
        sampled = model.generate(**batch, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=args.eval_samples, **common)
    greedy_scores = np.asarray(score(prompts, tokenizer.batch_decode(greedy[:, width:], skip_special_tokens=True)),
                               dtype=np.float64)
    repeated = [p for p in prompts for _ in range(args.eval_samples)]
    sampled_scores = np.asarray(score(repeated, tokenizer.batch_decode(sampled[:, width:], skip_special_tokens=True)),
                                dtype=np.float64)
    # the prompt means are the independent units: their spread gives the standard error
    per_prompt = sampled_scores.reshape(len(prompts), args.eval_samples).mean(axis=1)
    return {"sampled_mean": float(sampled_scores.mean()),
            "sampled_se": float(per_prompt.std(ddof=1) / math.sqrt(len(prompts))) if len(prompts) > 1 else 0.0,
            "greedy_mean": float(greedy_scores.mean()), "prompts": len(prompts), "samples": args.eval_samples}
