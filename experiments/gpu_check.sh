#!/usr/bin/env bash
# The GPU check: one call on a GPU machine runs everything below and prints one table.
#
#   bash experiments/gpu_check.sh [OUT]        # OUT: where the logs and JSON go (default $OUT or /tmp/gpu_check)
#
# On a GPU machine whose image has torch and transformers but not ray, deepspeed or gymnasium, from the repo
# root (`bash ../shared/device/make-bundle.sh` here first, and carry `.devbundle`):
#
#   bash .devbundle/setup.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH && bash experiments/gpu_check.sh
#
# 1. the quickstart with `learner.use_gpu=true rollout.use_gpu=true learner.bf16=true` (NCCL learner group,
#    bf16, GPU rollout worker); its metrics give the learner's tokens/s and the weight sync's seconds on GPU;
# 2. the rollout benchmark against Hugging Face `generate` on a GPT-2-small-shaped model (124M) at batch 256
#    and 1024 (`bench_rollout.py --device cuda`), greedy, so both sides must make the same tokens;
# 3. the weight-sync table (`bench_sync.py --table`): object store against the collective path (gloo), to
#    1, 2 and 4 GPU-less workers, on this machine's cores;
# then one table of all of it. Each step has its own time bound and a failing step does not stop the others.
#
# Not run by any machine yet (written where there was no GPU): expect to fix what breaks on the first run.
# NCCL weight sync is not built (the collective path is gloo); `bench_learner.py` is CPU-only (a gloo group of
# one rank), so the learner's GPU figure comes from the quickstart's metrics.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

STEPS=${GPU_CHECK_STEPS:-quickstart rollout sync}  # a subset, to try the script where there is no GPU

step() {  # step NAME SECONDS COMMAND...: run with a bound, log to OUT_DIR/NAME.log, record the exit status
  local name=$1 seconds=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name (at most ${seconds} s): $*" >&2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT_DIR/steps.jsonl"
  echo "   rc=$rc in $((SECONDS - start)) s; last lines:" >&2
  tail -n 5 "$OUT_DIR/$name.log" >&2
}

rm -f "$OUT_DIR/steps.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  >>"$OUT_DIR/gpu.txt" 2>&1
cat "$OUT_DIR/gpu.txt" >&2

step quickstart 420 python -m rlhf_ray.cli train experiments/quickstart.yaml learner.use_gpu=true \
  rollout.use_gpu=true learner.bf16=true train.iterations=10 "output_dir=$OUT_DIR/runs"
step rollout 600 python experiments/bench_rollout.py --device cuda \
  --cases gpt2_small_b256_greedy,gpt2_small_b1024_greedy --continuous-cases '' --repeats 3 --min-seconds 0 \
  --threads 4 --json "$OUT_DIR/rollout.json"
step sync 420 python experiments/bench_sync.py --table --repeats 3 --json "$OUT_DIR/sync.json"

python - "$OUT_DIR" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("\nGPU check:", " | ".join((out / "gpu.txt").read_text().split("\n")).strip(" |"))
steps = out / "steps.jsonl"
for line in steps.read_text().splitlines() if steps.exists() else []:
    step = json.loads(line)
    print(f"  step {step['step']:<11} rc={step['rc']:<4} {step['seconds']:>5} s")
rows = []
metrics = out / "runs" / "quickstart" / "metrics.jsonl"
if metrics.exists():
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    if lines:
        last = lines[-1]
        rows += [("quickstart on GPU: iterations", len(lines)),
                 ("quickstart: reward first -> last", f"{lines[0]['rollout/reward_mean']:+.3f} -> {last['rollout/reward_mean']:+.3f}"),
                 ("learner tokens/s (last iteration, bf16)", f"{last['perf/learner_tokens_per_s']:.0f}"),
                 ("rollout tokens/s (last iteration)", f"{last['perf/rollout_tokens_per_s']:.0f}"),
                 ("weight sync s (last iteration)", f"{last['perf/sync_s']:.3f}")]
rollout = out / "rollout.json"
if rollout.exists():
    for r in json.loads(rollout.read_text())["results"]:
        rows.append((f"rollout {r['case']}: sampler / generate tokens/s",
                     f"{r['sampler_tokens_per_s']:.0f} / {r['generate_tokens_per_s']:.0f} = "
                     f"{r['sampler_vs_generate_ratio']:.2f}x (greedy rows equal {r['greedy_rows_equal']:.0%})"))
sync = out / "sync.json"
if sync.exists():
    for r in json.loads(sync.read_text())["rows"]:
        if r["payload"] == "full state dict":
            rows.append((f"sync {r['bytes'] / 1e6:.0f} MB to {r['workers']} worker(s), {r['path']}", f"{r['sync_s']:.3f} s"))
width = max((len(name) for name, _ in rows), default=10)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
EOF
