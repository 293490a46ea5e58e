"""Benchmark weight sync: the learner's full state dict to every rollout worker, against the floors under it.

    python experiments/bench_sync.py [--model smollm2-shape] [--workers 2] [--repeats 5] [--json PATH]
    python experiments/bench_sync.py --quick          # tiny GPT-2, 1 repeat: a smoke run
    python experiments/bench_sync.py --table          # both paths, every payload, 1, 2 and 4 workers

The measure is `RolloutPool.set_weights(state_dict, version)` (rlhf_ray/rollout/pool.py), the call the
training loop makes after every PPO update: one `ray.put` of the state dict, then every worker's
`set_weights` resolves the shared object and `load_state_dict`s it, and the call returns when all have.
Each repeat sends a new policy version. The model is, by default, one with SmolLM2-135M's shape (Llama,
hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, 49152-word vocabulary, tied embeddings: 134.5M
parameters, 538 MB in fp32), randomly initialised from its config and saved to a temporary folder for
the workers to load: nothing is downloaded or read from a model cache.

Floors measured in the same run, interleaved with the syncs so that a shared machine's drift hits
them alike (median of `--repeats` each, after one warm-up):

- object store: `ray.put` of the same state dict and one `ray.get` of it in the driver: what the
  sync costs before any worker, RPC or parameter copy (`sync_vs_object_store_ratio` = sync ÷ this);
- memory copy: `model.load_state_dict` of the same state dict in the driver: one copy of the bytes;
- zero-copy object store: `ray.put` of the tensors as NumPy arrays, `ray.get` (which maps them from
  shared memory without a copy) and `load_state_dict` from them: what one worker's share of a sync
  could cost if weights travelled as arrays; torch tensors travel through `torch.save` bytes instead
  (unless Ray's RAY_ENABLE_ZERO_COPY_TORCH_TENSORS is set, see `--zero-copy-tensors`).

Correctness is checked once, after the warm-up sync, whose weights differ from the ones the workers
loaded from disk: every worker's `weights_digest` must equal the digest of the state dict sent.

`--table`: seconds against bytes and workers, both paths: `RolloutPool.set_weights` (the object store) and
`RolloutPool.set_weights_collective` (`rollout.sync: collective`, gloo sends from the driver, which stands for
the learner's rank 0), for the full state dict and the LoRA payloads below, to 1, 2 and 4 workers (the pool
grows between rows; the collective group is made again, outside the timing). Median of `--repeats` after a
warm-up per cell; every worker's digest is checked after each path's warm-up.

LoRA rows (`model.lora`): the same call with only the adapters (`rlhf_ray.models.lora.adapter_payload`)
of r=16 adapters on the attention projections q_proj and v_proj, and on every linear layer, with random
(non-zero) B; each worker merges them into the base weights it keeps. After each warm-up, every worker's
digest must equal that of the learner-side merge (`merged_state_dict`) of the same adapters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchlib import progress, write_json  # experiments/benchlib.py

ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
# weight-loading progress bars and logs of every worker would bury the table
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
             "OMP_NUM_THREADS": "1"}
MODELS = ("smollm2-shape", "tiny")


def build_model_folder(kind: str, folder: Path):
    """The model the workers load (saved to `folder` unless it is a built-in), and the driver's copy of it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_ray.models import resolve_model_path
    from rlhf_ray.models.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

    if kind == "tiny":
        path = resolve_model_path("rlhf-ray/tiny-gpt2")
        return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if kind != "smollm2-shape":
        raise ValueError(f"unknown model {kind!r}; expected one of {MODELS}")
    # SmolLM2-135M's shape (its config.json), with a word-level tokenizer of the same vocabulary size
    words = SPECIAL_TOKENS + [f"w{i}" for i in range(49152 - len(SPECIAL_TOKENS))]
    tokenizer = build_tiny_tokenizer(words)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def unique_tensors(state_dict: dict) -> list:
    """Each tensor once: tied weights appear under two names as one tensor, as in `gather_full_state_dict`."""
    seen = {}
    for tensor in state_dict.values():
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def learner_state_dict(model) -> dict:
    """A CPU fp32 copy of the weights, tied ones shared, as the learner sends; values moved off the model's.

    Every floating tensor is scaled by 1.01, so a worker holds these weights only if the sync arrived.
    """
    copies, state = {}, {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in copies:
            copy = tensor.detach().to("cpu", copy=True)
            if copy.is_floating_point():
                copy.mul_(1.01)
            copies[tensor.data_ptr()] = copy
        state[name] = copies[tensor.data_ptr()]
    return state


def time_object_store_floor(ray, state: dict) -> float:
    start = time.perf_counter()
    ref = ray.put(state)
    fetched = ray.get(ref)
    elapsed = time.perf_counter() - start
    del ref, fetched
    return elapsed


def time_memory_copy_floor(model, state: dict) -> float:
    start = time.perf_counter()
    model.load_state_dict(state, strict=False)  # strict=False: a tied weight may be listed once
    return time.perf_counter() - start


def time_zero_copy_floor(ray, model, state: dict) -> float:
    import torch

    start = time.perf_counter()
    arrays = {}
    as_array = {}  # id of a tensor -> its array, so a tied weight is sent once, as the tensor dict does
    for name, tensor in state.items():
        arrays[name] = as_array.setdefault(id(tensor), tensor.numpy())
    ref = ray.put(arrays)
    fetched = ray.get(ref)  # read-only views of the object store's shared memory: no copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable": only read here
        model.load_state_dict({name: torch.from_numpy(a) for name, a in fetched.items()}, strict=False)
    elapsed = time.perf_counter() - start
    del ref, fetched
    return elapsed


def lora_targets(kind: str) -> dict[str, list[str] | str]:
    """The LoRA rows: attention projections (GPT-2 has one fused c_attn), and every linear layer."""
    return {"q_proj+v_proj" if kind != "tiny" else "c_attn": ["q_proj", "v_proj"] if kind != "tiny" else ["c_attn"],
            "all-linear": "all-linear"}


def lora_payload(model, targets, r: int = 16) -> dict:
    """Adapters of rank `r` on `targets` of (a copy of) `model`, B random: what a LoRA sync sends."""
    import copy

    import torch

    from rlhf_ray.config import LoraSettings
    from rlhf_ray.models.lora import adapter_payload, add_adapters

    lora = LoraSettings(r=r, alpha=2.0 * r, target_modules=targets)
    adapted = add_adapters(copy.deepcopy(model), lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return adapter_payload(adapted.state_dict(), lora.alpha / lora.r)


def time_lora_syncs(pool, model, state: dict, kind: str, repeats: int, version: int, started: float) -> dict:
    """Per LoRA row: bytes sent, the median sync seconds after a warm-up, and the digests checked."""
    from rlhf_ray.models.lora import merged_state_dict
    from rlhf_ray.rollout.worker import state_dict_digest

    rows = {}
    for label, targets in lora_targets(kind).items():
        payload = lora_payload(model, targets)
        pool.set_weights(payload, version)
        expected = state_dict_digest(merged_state_dict(model, state, payload))
        wrong = sorted(w for w, digest in pool.weights_digests().items() if digest != expected)
        if wrong:
            raise RuntimeError(f"LoRA {label}: workers {wrong} do not hold the merged weights")
        times = []
        for _ in range(repeats):
            version += 1
            times.append(pool.set_weights(payload, version))
        version += 1
        rows[label] = {"bytes": sum(t.numel() * t.element_size() for t in payload.values()),
                       "sync_s": statistics.median(times), "runs": times}
        progress(f"LoRA {label}: {rows[label]['bytes'] / 1e6:.2f} MB, sync {rows[label]['sync_s']:.4f} s", started)
    return rows


def sync_table(pool, model, state: dict, kind: str, workers: list[int], repeats: int, started: float) -> list[dict]:
    """Rows of (payload, bytes, workers, path, median seconds): both sync paths, every payload, each pool size."""
    from rlhf_ray.models.lora import merged_state_dict
    from rlhf_ray.rollout.worker import state_dict_digest

    payloads = {"full state dict": (state, state_dict_digest(state))}
    for label, targets in lora_targets(kind).items():
        payload = lora_payload(model, targets)
        payloads[f"LoRA {label}"] = (payload, state_dict_digest(merged_state_dict(model, state, payload)))
    paths = {"object store": pool.set_weights, "collective": pool.set_weights_collective}
    rows, version = [], 100
    for count in workers:
        while len(pool) < count:
            pool.add_worker()
            pool.wait_ready(timeout=None)
        for label, (payload, expected) in payloads.items():
            for path, sync in paths.items():
                if label.startswith("LoRA"):  # adapters merge into the base weights the workers keep
                    pool.set_weights(state, version)
                    version += 1
                sync(payload, version)  # warm-up (and, for the collective path, the group of these members)
                version += 1
                wrong = sorted(w for w, digest in pool.weights_digests().items() if digest != expected)
                if wrong:
                    raise RuntimeError(f"{path}, {label}: workers {wrong} do not hold the weights sent")
                times = []
                for _ in range(repeats):
                    times.append(sync(payload, version))
                    version += 1
                nbytes = sum(t.numel() * t.element_size() for t in unique_tensors(payload))
                rows.append({"payload": label, "bytes": nbytes, "workers": count, "path": path,
                             "sync_s": statistics.median(times), "runs": times})
                progress(f"{count} worker(s), {label}, {path}: {rows[-1]['sync_s']:.4f} s", started)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'payload':<24} {'MB':>8} {'workers':>7} {'object store s':>15} {'collective s':>13} {'ratio':>6}")
    cells = {(r["payload"], r["workers"], r["path"]): r for r in rows}
    for (label, count, path), row in cells.items():
        if path != "object store":
            continue
        other = cells[(label, count, "collective")]
        print(f"{label:<24} {row['bytes'] / 1e6:>8.2f} {count:>7} {row['sync_s']:>15.4f} {other['sync_s']:>13.4f} "
              f"{other['sync_s'] / row['sync_s']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-shape",
                        help="smollm2-shape: SmolLM2-135M's shape, random weights (default); tiny: rlhf-ray/tiny-gpt2")
    parser.add_argument("--workers", type=int, default=2, help="rollout workers (1 CPU each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs (and floors), after one warm-up")
    parser.add_argument("--zero-copy-tensors", action="store_true",
                        help=f"set {ZERO_COPY_ENV}=1 in the driver and the workers: Ray then sends torch tensors "
                             "as arrays that `ray.get` maps without a copy")
    parser.add_argument("--quick", action="store_true", help="smoke run: --model tiny --repeats 1")
    parser.add_argument("--table", action="store_true",
                        help="both paths (object store, collective), every payload, to 1, 2 and 4 workers")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny", 1
    if args.workers < 1 or args.repeats < 1:
        parser.error("--workers and --repeats must be >= 1")
    env = dict(QUIET_ENV)
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, QUIET_ENV[name])  # the driver's own model load, too
    if args.zero_copy_tensors:
        os.environ[ZERO_COPY_ENV] = "1"  # read when Ray is imported, hence before the import below
        env[ZERO_COPY_ENV] = "1"

    import ray
    import torch

    from rlhf_ray.rollout.pool import RolloutPool, WorkerSpec
    from rlhf_ray.rollout.sampler import SamplingParams
    from rlhf_ray.rollout.worker import state_dict_digest

    torch.set_num_threads(1)  # the driver's copies run on one thread, as a learner rank's gather does
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_sync_") as tmp:
        started = time.perf_counter()
        path, model = build_model_folder(args.model, Path(tmp))
        state = learner_state_dict(model)
        parameters = sum(t.numel() for t in unique_tensors(state) if t.is_floating_point())
        model_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(state))
        progress(f"model {args.model}: {parameters / 1e6:.1f}M parameters, {model_bytes / 1e6:.2f} MB", started)

        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4 if args.table else args.workers),
                 include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env})
        progress("Ray started", started)
        pool = None
        try:
            spec = WorkerSpec(policy=str(path), reward="envs.builtin:sentiment_reward",
                              params=SamplingParams(max_new_tokens=4))
            if args.table:
                pool = RolloutPool(spec, num_workers=1, name="bench-sync-table")
                pool.wait_ready(timeout=None)
                rows = sync_table(pool, model, state, args.model, [1, 2, 4], args.repeats, started)
                print(f"\nweight sync, {args.model}: median of {args.repeats} after a warm-up, every worker's "
                      "digest checked; ratio = collective / object store")
                print_table(rows)
                if args.json:
                    write_json(args.json, {"benchmark": "sync_table", "model": args.model, "rows": rows,
                                           "cpus": os.cpu_count(), "torch": torch.__version__})
                return 0
            pool = RolloutPool(spec, num_workers=args.workers, name="bench-sync")
            pool.wait_ready(timeout=None)
            if len(pool) != args.workers:
                raise RuntimeError(f"{len(pool)} of {args.workers} rollout workers started")
            progress(f"{args.workers} rollout worker(s) ready", started)

            # warm-up sync, then the check: every worker holds exactly the weights sent
            warmup_s = pool.set_weights(state, version=1)
            expected = state_dict_digest(state)
            digests = pool.weights_digests()
            wrong = {worker: digest for worker, digest in digests.items() if digest != expected}
            if wrong:
                raise RuntimeError(f"after set_weights, workers {sorted(wrong)} hold weights whose digest differs "
                                   f"from the state dict sent ({expected[:12]}): the sync did not deliver them")
            progress(f"warm-up sync {warmup_s:.3f} s; every worker's weights digest checked", started)
            time_object_store_floor(ray, state)
            time_memory_copy_floor(model, state)
            time_zero_copy_floor(ray, model, state)

            runs = {"sync_s": [], "object_store_floor_s": [], "memory_copy_floor_s": [], "zero_copy_floor_s": []}
            for repeat in range(args.repeats):  # interleaved: drift of a shared machine hits all alike
                runs["sync_s"].append(pool.set_weights(state, version=2 + repeat))
                runs["object_store_floor_s"].append(time_object_store_floor(ray, state))
                runs["memory_copy_floor_s"].append(time_memory_copy_floor(model, state))
                runs["zero_copy_floor_s"].append(time_zero_copy_floor(ray, model, state))
                progress(f"[{repeat + 1}/{args.repeats}] sync {runs['sync_s'][-1]:.3f} s", started)
            lora = time_lora_syncs(pool, model, state, args.model, args.repeats, 2 + args.repeats, started)
        finally:
            if pool is not None:
                pool.shutdown()
            ray.shutdown()
            progress("Ray shut down", started)
    load_after = os.getloadavg()

    medians = {name: statistics.median(values) for name, values in runs.items()}
    sync_s = medians["sync_s"]
    report = {
        "benchmark": "sync", "model": args.model, "parameters": parameters, "model_bytes": model_bytes,
        "dtype": "float32", "workers": args.workers, "repeats": args.repeats,
        "zero_copy_tensors": args.zero_copy_tensors, "warmup_sync_s": warmup_s, **medians,
        "sync_gb_per_s": model_bytes / sync_s / 1e9,  # model bytes per second of sync
        "delivered_gb_per_s": args.workers * model_bytes / sync_s / 1e9,  # bytes landed in workers per second
        "sync_vs_object_store_ratio": sync_s / medians["object_store_floor_s"],
        "sync_vs_memory_copy_ratio": sync_s / medians["memory_copy_floor_s"],
        "digests_checked": len(digests), "runs": runs, "lora": lora, "cpus": os.cpu_count(), "torch": torch.__version__,
        "ray": ray.__version__, "load_average_before": load_before[0], "load_average_after": load_after[0],
    }

    print(f"\nweight sync, {args.model} ({parameters / 1e6:.1f}M parameters, {model_bytes / 1e6:.2f} MB fp32) "
          f"to {args.workers} worker(s), median of {args.repeats} after a warm-up; digests of "
          f"{len(digests)} worker(s) checked")
    print(f"{'measure':<52} {'seconds':>9} {'GB/s':>7} {'sync ÷ it':>10}")
    for name, label in [("sync_s", "RolloutPool.set_weights"),
                        ("object_store_floor_s", "floor: ray.put + ray.get (driver)"),
                        ("memory_copy_floor_s", "floor: load_state_dict (driver)"),
                        ("zero_copy_floor_s", "floor: ray.put + get as NumPy + load_state_dict")]:
        print(f"{label:<52} {medians[name]:>9.4f} {model_bytes / medians[name] / 1e9:>7.2f} "
              f"{sync_s / medians[name]:>10.2f}")
    print("\nLoRA r=16: only the adapters travel; workers merge them into the base weights they keep")
    print(f"{'sync':<32} {'MB sent':>9} {'fewer bytes':>12} {'seconds':>9} {'faster':>8}")
    print(f"{'full state dict':<32} {model_bytes / 1e6:>9.2f} {1:>11.0f}x {sync_s:>9.4f} {1:>7.1f}x")
    for label, row in lora.items():
        print(f"{'adapters on ' + label:<32} {row['bytes'] / 1e6:>9.2f} {model_bytes / row['bytes']:>11.0f}x "
              f"{row['sync_s']:>9.4f} {sync_s / row['sync_s']:>7.1f}x")
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
