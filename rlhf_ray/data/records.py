"""The records of the kinds of RLHF data, and the error a malformed one raises.

- prompts, for PPO rollouts (Ziegler et al. 2019; Ouyang et al. 2022, "the PPO dataset");
- (prompt, response) demonstrations, for supervised fine-tuning ("the SFT dataset");
- (prompt, chosen, rejected) comparisons, for the reward model's pairwise loss
  -log sigmoid(r(chosen) - r(rejected)) ("the RM dataset");
- (prompt, response, satisfaction) ratings and likes, for the user-satisfaction model S.

Texts are raw: a chat template, when the model has one, is applied by `rlhf_ray.data.chat`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.errors import UserError


class DataError(UserError, ValueError):
    """A dataset that cannot be read, or a record in it that is malformed; the message names file and line
    (`data/prefs.jsonl:17: missing field 'chosen'`) or row (`row 5 of x.parquet: ...`)."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str  # the demonstration that follows the prompt


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str  # the response a labeller preferred
    rejected: str  # the one they did not


@dataclass(frozen=True)
class RatingRecord:
    prompt: str
    response: str
    satisfaction: float  # in [0, 1]: a rating r of 1..5 as (r - 1) / 4, a like as 1, a dislike as 0
