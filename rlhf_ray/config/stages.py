"""The sections of the pipeline's supervised stages: SFT, the reward model, the satisfaction model, DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.config.section import _Section
from rlhf_ray.data.config import DatasetConfig


class StageConfig(_Section):
    """A stage before PPO (SFT, reward model, satisfaction model, DPO), trained by the DeepSpeed learner."""

    base: str  # the model the stage starts from (folder, built-in or hub name; "{run}" allowed)
    data: DatasetConfig
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0.0)
    batch_size: int = Field(8, ge=1)  # sequences (SFT) or pairs (RM) per optimizer step, all ranks
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # records held out to report loss / accuracy
    max_length: int = Field(512, ge=8)  # tokens of prompt + response; longer records are cut on the left
    weight_decay: float = Field(0.0, ge=0.0)


class FeedbackStageConfig(StageConfig):
    """A stage that reads a dataset file or a served model's feedback database (`rlhf-ray serve --feedback-db`),
    which the pipeline exports as `rlhf-ray feedback export` does into {run}/<stage>_feedback/."""

    data: DatasetConfig | None = None  # or feedback_db
    feedback_db: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "FeedbackStageConfig":
        if (self.data is None) == (self.feedback_db is None):
            raise ValueError("set one of data (a dataset file) and feedback_db (a feedback database)")
        return self


class DPOStageConfig(FeedbackStageConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) pairs (rlhf_ray/algorithms/preference.py):
    the policy against the frozen start model, no reward model, no sampling. From feedback_db: the preference
    pairs, ties left out."""

    loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)  # DPO/IPO: the KL strength; SimPO: the reward scale (about 2)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # conservative DPO (and SimPO): share of flipped labels
    simpo_gamma: float = Field(0.5, ge=0.0)  # SimPO's target margin
    # RPO: plus rpo_alpha x the chosen response's NLL per token, which keeps DPO from lowering the chosen ones
    rpo_alpha: float = Field(0.0, ge=0.0)


class SatisfactionStageConfig(FeedbackStageConfig):
    """The user-satisfaction model S (rlhf_ray/stages/satisfaction.py): a regression head on (prompt, response)
    trained on ratings 1..5 and likes, scaled to [0, 1]. From feedback_db: the latest rating of each answer."""
