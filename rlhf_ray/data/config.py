"""`DatasetConfig`: where a dataset is and how to read it, as one section of the run config.

    data:
      preferences:
        path: experiments/data/preferences.jsonl
        chosen_field: better      # the names this file uses
        rejected_field: worse
        on_error: skip

Each loader reads only the fields its kind needs: prompts `prompt_field`; SFT adds `response_field`;
preferences add `chosen_field` and `rejected_field`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhf_ray.data.chat import format_records
from rlhf_ray.data.loading import load_preferences, load_prompts, load_ratings, load_sft
from rlhf_ray.data.records import PreferenceRecord, PromptRecord, RatingRecord, SFTRecord


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str  # a .jsonl/.ndjson or .parquet/.pq file, or a folder `datasets` save_to_disk wrote
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"  # auto: by suffix; a folder is hf
    split: str | None = None  # the split of a `datasets` folder with several
    prompt_field: str = "prompt"
    response_field: str = "response"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    rating_field: str = "rating"  # ratings: a whole number 1..5 ...
    like_field: str = "like"  # ... or a like, true or false
    on_error: Literal["raise", "skip"] = "raise"  # a malformed record: stop, or leave it out and log it
    chat_template: bool | None = None  # None: apply the tokenizer's chat template when it has one
    limit: int | None = Field(None, ge=1)  # read at most this many records (quick runs)
    skip: int = Field(0, ge=0)  # leave out the first records, e.g. those another stage trains on

    @field_validator("path", "prompt_field", "response_field", "chosen_field", "rejected_field", "rating_field",
                     "like_field")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def _options(self) -> dict:
        return {"on_error": self.on_error, "format": self.format, "split": self.split, "limit": self.limit,
                "skip": self.skip}

    def load_prompts(self, tokenizer=None) -> list[PromptRecord]:
        """The prompts; formatted for the chat template when a tokenizer is given (see `chat_template`)."""
        records = load_prompts(self.path, field=self.prompt_field, **self._options())
        return records if tokenizer is None else format_records(records, tokenizer, self.chat_template)

    def load_sft(self, tokenizer=None) -> list[SFTRecord]:
        records = load_sft(self.path, prompt_field=self.prompt_field, response_field=self.response_field,
                           **self._options())
        return records if tokenizer is None else format_records(records, tokenizer, self.chat_template)

    def load_preferences(self, tokenizer=None) -> list[PreferenceRecord]:
        records = load_preferences(self.path, prompt_field=self.prompt_field, chosen_field=self.chosen_field,
                                   rejected_field=self.rejected_field, **self._options())
        return records if tokenizer is None else format_records(records, tokenizer, self.chat_template)

    def load_ratings(self, tokenizer=None) -> list[RatingRecord]:
        records = load_ratings(self.path, prompt_field=self.prompt_field, response_field=self.response_field,
                               rating_field=self.rating_field, like_field=self.like_field, **self._options())
        return records if tokenizer is None else format_records(records, tokenizer, self.chat_template)
