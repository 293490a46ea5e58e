"""The learner: DeepSpeed engines (ZeRO-2/3, CPU gloo or GPU NCCL) inside Ray Train workers."""

from rlhf_ray.learner.distributed import (
    all_reduce_sum, deepspeed_worker_env, get_rank, get_world_size, global_token_mean_loss,
)
from rlhf_ray.learner.engine import (
    EngineConfig, build_deepspeed_config, create_engine, create_reference_engine, disable_dropout, gather_full_state_dict,
    make_optimizer,
)

__all__ = [
    "EngineConfig", "all_reduce_sum", "build_deepspeed_config", "create_engine", "create_reference_engine",
    "deepspeed_worker_env", "disable_dropout", "gather_full_state_dict", "get_rank", "get_world_size", "global_token_mean_loss",
    "make_optimizer",
]
