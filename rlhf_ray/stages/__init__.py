"""The supervised stages before PPO, each trained by the DeepSpeed learner inside Ray Train workers.

- `sft`: supervised fine-tuning on (prompt, response) demonstrations, loss on response tokens only;
- `reward_model`: a scalar-head reward model from (prompt, chosen, rejected) comparisons with the
  Bradley-Terry loss, its held-out pair accuracy, and the statistics that normalise its scores.

Each writes a Hugging Face folder (`{run}/sft`, `{run}/reward_model`) with `metrics.jsonl` and
`summary.json` inside, renamed into place when complete, so a folder that exists is finished.
"""

from rlhf_ray.stages.common import StageError, run_stage, stage_complete

__all__ = ["StageError", "run_stage", "stage_complete"]
