"""Typed run configuration loaded from YAML with dotted overrides (`rlhf_ray.config.loading`)."""

from rlhf_ray.config.loading import ConfigError, apply_overrides, dump_config, load_config
from rlhf_ray.config.schema import (
    STAGE_SECTIONS, DataConfig, KLConfig, LearnerConfig, LoraSettings, ModelConfig, PPOConfig, RewardComponent,
    DialogueConfig, RewardConfig, RolloutConfig, RunConfig, SamplingConfig, TrainConfig, WorkersConfig,
)
from rlhf_ray.config.stages import DPOStageConfig, SatisfactionStageConfig, StageConfig

__all__ = [
    "STAGE_SECTIONS", "ConfigError", "DataConfig", "DPOStageConfig", "KLConfig", "LearnerConfig", "LoraSettings",
    "DialogueConfig", "ModelConfig", "PPOConfig", "RewardComponent", "RewardConfig", "RolloutConfig", "RunConfig",
    "SamplingConfig",
    "SatisfactionStageConfig", "StageConfig", "TrainConfig", "WorkersConfig", "apply_overrides", "dump_config",
    "load_config",
]
