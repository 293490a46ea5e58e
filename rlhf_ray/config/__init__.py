"""Typed run configuration loaded from YAML with dotted overrides (`rlhf_ray.config.loading`)."""

from rlhf_ray.config.loading import ConfigError, apply_overrides, dump_config, load_config
from rlhf_ray.config.schema import (
    DataConfig, DPOStageConfig, KLConfig, LearnerConfig, LoraSettings, ModelConfig, PPOConfig, RewardComponent, RewardConfig,
    RolloutConfig, RunConfig, SamplingConfig, StageConfig, TrainConfig, WorkersConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "DPOStageConfig", "KLConfig", "LearnerConfig", "LoraSettings", "ModelConfig", "PPOConfig",
    "RewardComponent", "RewardConfig", "RolloutConfig", "RunConfig", "SamplingConfig", "StageConfig", "TrainConfig",
    "WorkersConfig", "apply_overrides", "dump_config", "load_config",
]
