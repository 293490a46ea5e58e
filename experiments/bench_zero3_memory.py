"""Peak memory per learner rank: ZeRO-2, ZeRO-3 partitioned after the load (as before `partitioned_load`), and
ZeRO-3 partitioned as it loads (`rlhf_ray.learner.engine.partitioned_load`, `deepspeed.zero.Init`).

    python experiments/bench_zero3_memory.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--ranks 2] [--json PATH]
    python experiments/bench_zero3_memory.py --model rlhf-ray/tiny-gpt2      # a smoke run

Each setting runs in a fresh Ray Train group of `--ranks` CPU ranks (gloo), which does what the learner does
with its actor: load the policy (`from_pretrained`, float32), make the DeepSpeed engine (AdamW), take one
optimizer step on `--tokens` random tokens per rank, and gather the full weights on rank 0 for a weight sync
(`gather_full_state_dict`, module by module). A thread in every rank reads /proc/self/status every 2 ms:
the table has the peak of the process's private memory (RssAnon: what the rank allocated, not the
checkpoint file's pages, which the kernel shares and can drop) above what it held before the load, at
the end of each phase; and VmHWM, the peak of its whole resident set, which includes the file's pages.

`--trim` runs the ranks with glibc returning freed memory to the system at once (MALLOC_TRIM_THRESHOLD_=0,
MALLOC_MMAP_THRESHOLD_=65536): without it, a rank's resident memory keeps what it once allocated and freed
(ZeRO-3 gathers and frees every layer), and the peaks say more about the allocator than about ZeRO.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from benchlib import progress, write_json  # experiments/benchlib.py

SETTINGS = {  # name: (ZeRO stage, partitioned as it loads)
    "ZeRO-2": (2, False),
    "ZeRO-3, partitioned after the load (before)": (3, False),
    "ZeRO-3, partitioned as it loads (zero.Init)": (3, True),
}
PHASES = ("load", "engine", "step", "gather")


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """The peak RssAnon of this process, sampled every 2 ms by a thread."""

    def __init__(self):
        self.peak, self.running = status_kb("RssAnon"), True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, status_kb("RssAnon"))
            time.sleep(0.002)

    def read(self) -> int:
        self.peak = max(self.peak, status_kb("RssAnon"))
        return self.peak


def one_rank(config: dict) -> dict:
    """Ray Train worker: load, engine, one step, gather; this rank's peaks (MB above the start), all ranks'
    gathered on rank 0."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlhf_ray.learner.engine import EngineConfig, create_engine, gather_full_state_dict, partitioned_load

    torch.set_num_threads(1)
    sampler = PeakSampler()
    start = status_kb("RssAnon")
    cfg = EngineConfig(zero_stage=config["stage"], micro_batch_size=1)
    world = dist.get_world_size()
    peaks = {}
    with partitioned_load(cfg, world) if config["zero_init"] else nullcontext():
        model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    peaks["load"] = sampler.read()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.data.numel() for p in model.parameters())
    engine = create_engine(model, cfg, train_batch_size=world)
    peaks["engine"] = sampler.read()
    generator = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, model.config.vocab_size, (1, config["tokens"]), generator=generator)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    peaks["step"] = sampler.read()
    gather_full_state_dict(engine)
    peaks["gather"] = sampler.read()
    sampler.running = False
    mine = {"rank": dist.get_rank(), "held_parameters": held, "vm_hwm_mb": status_kb("VmHWM") / 1024,
            "start_mb": start / 1024, **{f"{p}_mb": (peaks[p] - start) / 1024 for p in PHASES}}
    every = [None] * world
    dist.all_gather_object(every, mine)
    return {"ranks": every}


TRIM_ENV = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_setting(model: str, ranks: int, stage: int, zero_init: bool, tokens: int, storage: Path,
                trim: bool) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf_ray.learner.distributed import deepspeed_worker_env

    trainer = TorchTrainer(one_rank,
                           train_loop_config={"model": model, "stage": stage, "zero_init": zero_init, "tokens": tokens},
                           scaling_config=ScalingConfig(num_workers=ranks, use_gpu=False,
                                                        resources_per_worker={"CPU": 1}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name=f"zero{stage}-{int(zero_init)}", storage_path=str(storage),
                                                worker_runtime_env={"env_vars": {
                                                    **deepspeed_worker_env(use_gpu=False),
                                                    "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
                                                    **(TRIM_ENV if trim else {})}}))
    return trainer.fit().return_value["ranks"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the one training sequence per rank")
    parser.add_argument("--trim", action="store_true", help="glibc returns freed memory at once (see above)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import ray

    from rlhf_ray.models import resolve_model_path

    path = str(resolve_model_path(args.model))
    started = time.perf_counter()
    ray.init(address="local", num_cpus=max(args.ranks, 2), include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_zero3_") as tmp:
            for name, (stage, zero_init) in SETTINGS.items():
                results[name] = run_setting(path, args.ranks, stage, zero_init, args.tokens, Path(tmp), args.trim)
                progress(f"{name}: done", started)
    finally:
        ray.shutdown()
    parameters = max(r["held_parameters"] for r in results["ZeRO-2"])

    print(f"\npeak private memory (RssAnon) per learner rank above its start, MB: {args.model} "
          f"({parameters / 1e6:.1f}M parameters, {parameters * 4 / 1e6:.0f} MB float32), {args.ranks} CPU ranks, "
          f"AdamW, one step of {args.tokens} tokens per rank"
          + (", freed memory returned at once (--trim)" if args.trim else ""))
    header = f"{'setting':<46} {'rank':>4} {'params held':>12} " + " ".join(f"{p:>8}" for p in PHASES) + f" {'VmHWM':>8}"
    print(header)
    for name, ranks in results.items():
        for r in ranks:
            print(f"{name:<46} {r['rank']:>4} {r['held_parameters'] / 1e6:>11.1f}M "
                  + " ".join(f"{r[p + '_mb']:>8.0f}" for p in PHASES) + f" {r['vm_hwm_mb']:>8.0f}")
    if args.json:
        write_json(args.json, {"benchmark": "zero3_memory", "model": args.model, "ranks": args.ranks,
                               "tokens": args.tokens, "trim": args.trim, "parameters": parameters,
                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
