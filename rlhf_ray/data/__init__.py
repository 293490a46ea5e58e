"""Prompt, SFT, preference and rating datasets: JSONL, Parquet or a local `datasets` folder, with chat templates.

`load_prompts`, `load_sft`, `load_preferences` and `load_ratings` read a file into typed records
(`PromptRecord`, `SFTRecord`, `PreferenceRecord`, `RatingRecord`); `DatasetConfig` is the same as a config section;
`format_prompt` puts a prompt into a chat model's template. A malformed record raises `DataError`
naming file and line, or is skipped and counted in the log (`on_error="skip"`).

Small datasets of the project's own making are in `experiments/data/` (see `make_data.py` there).
"""

from rlhf_ray.data.chat import format_prompt, format_records, has_chat_template, use_chat_template
from rlhf_ray.data.config import DatasetConfig
from rlhf_ray.data.loading import load_preferences, load_prompts, load_ratings, load_sft
from rlhf_ray.data.records import DataError, PreferenceRecord, PromptRecord, RatingRecord, SFTRecord
from rlhf_ray.data.sources import detect_format, iter_rows

__all__ = [
    "DataError", "DatasetConfig", "PreferenceRecord", "PromptRecord", "RatingRecord", "SFTRecord", "detect_format",
    "format_prompt", "format_records", "has_chat_template", "iter_rows", "load_preferences", "load_prompts",
    "load_ratings", "load_sft", "use_chat_template",
]
