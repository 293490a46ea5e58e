"""Prompt, SFT, preference and rating datasets as lists of typed records.

    prompts = load_prompts("experiments/data/prompts.jsonl")
    demos = load_sft("sft.parquet", prompt_field="question", response_field="answer")
    pairs = load_preferences("prefs.jsonl", on_error="skip")
    rated = load_ratings("ratings.jsonl")      # {"prompt", "response", "rating": 1..5} or {..., "like": true}

A record is malformed when a field is missing, null, not a string or blank (only whitespace), or,
for a comparison, when chosen and rejected are the same text. With `on_error="raise"` (the default)
the first one raises `DataError` naming file and line; with `on_error="skip"` each is left out and
the log says how many were, and why the first was. A dataset left with no record is an error either
way.
"""

from __future__ import annotations

import logging
import os
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from rlhf_ray.data.records import DataError, PreferenceRecord, PromptRecord, RatingRecord, SFTRecord
from rlhf_ray.data.sources import Format, iter_rows

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
Record = TypeVar("Record", PromptRecord, SFTRecord, PreferenceRecord, RatingRecord)


def load_prompts(path: str | os.PathLike, field: str = "prompt", on_error: OnError = "raise",
                 format: Format | Literal["auto"] = "auto", split: str | None = None,
                 limit: int | None = None, skip: int = 0) -> list[PromptRecord]:
    """The prompts of a dataset, read from the field `field` of every record."""
    return _load(path, [field], lambda texts, _: PromptRecord(*texts), on_error, format, split, limit, skip)


def load_sft(path: str | os.PathLike, prompt_field: str = "prompt", response_field: str = "response",
             on_error: OnError = "raise", format: Format | Literal["auto"] = "auto", split: str | None = None,
             limit: int | None = None, skip: int = 0) -> list[SFTRecord]:
    """The (prompt, response) demonstrations of a dataset."""
    return _load(path, [prompt_field, response_field], lambda texts, _: SFTRecord(*texts), on_error, format, split,
                 limit, skip)


def load_preferences(path: str | os.PathLike, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected", on_error: OnError = "raise",
                     format: Format | Literal["auto"] = "auto", split: str | None = None,
                     limit: int | None = None, skip: int = 0) -> list[PreferenceRecord]:
    """The (prompt, chosen, rejected) comparisons of a dataset."""
    def make(texts: list[str], _) -> PreferenceRecord:
        if texts[1] == texts[2]:
            raise ValueError(f"fields {chosen_field!r} and {rejected_field!r} are the same text: "
                             "a comparison needs two different responses")
        return PreferenceRecord(*texts)

    return _load(path, [prompt_field, chosen_field, rejected_field], make, on_error, format, split, limit, skip)


def load_ratings(path: str | os.PathLike, prompt_field: str = "prompt", response_field: str = "response",
                 rating_field: str = "rating", like_field: str = "like", on_error: OnError = "raise",
                 format: Format | Literal["auto"] = "auto", split: str | None = None, limit: int | None = None,
                 skip: int = 0) -> list[RatingRecord]:
    """The (prompt, response) pairs people rated 1..5 (`rating_field`) or liked or not (`like_field`: true or
    false), each with its satisfaction in [0, 1]; a record has one of the two."""
    def make(texts: list[str], values: dict) -> RatingRecord:
        return RatingRecord(*texts, satisfaction(values, rating_field, like_field))

    return _load(path, [prompt_field, response_field], make, on_error, format, split, limit, skip)


def satisfaction(values: dict, rating_field: str = "rating", like_field: str = "like") -> float:
    """A record's satisfaction in [0, 1]: its rating r (a whole number 1..5) as (r - 1) / 4, or its like as 1
    and dislike as 0; ValueError saying what is wrong otherwise."""
    rating, like = values.get(rating_field), values.get(like_field)
    if rating is not None and like is not None:
        raise ValueError(f"fields {rating_field!r} and {like_field!r} are both set: a record has one of them")
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, numbers.Real) or rating != int(rating) \
                or not 1 <= rating <= 5:
            raise ValueError(f"field {rating_field!r} must be a whole rating from 1 to 5, got {_short(rating)}")
        return (int(rating) - 1) / 4
    if like is not None:
        if not isinstance(like, bool):
            raise ValueError(f"field {like_field!r} must be true or false, got {_short(like)}")
        return float(like)
    raise ValueError(f"missing field {rating_field!r} (a rating 1..5) or {like_field!r} (true or false)")


def _field_text(values: dict, field: str) -> str:
    """The text of one field of a record, or ValueError saying what is wrong with it."""
    if field not in values:
        raise ValueError(f"missing field {field!r}")
    value = values[field]
    if value is None:
        raise ValueError(f"field {field!r} is null")
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is not a string (got {type(value).__name__} {_short(value)})")
    if not value.strip():
        raise ValueError(f"field {field!r} is blank")
    return value


def _short(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _load(path: str | os.PathLike, fields: Sequence[str], make: Callable[[list[str], dict], Record], on_error: OnError,
          format: Format | Literal["auto"], split: str | None, limit: int | None, skip: int = 0) -> list[Record]:
    """The records of `path` after its first `skip` (read, not checked: another split's), at most `limit`."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    records: list[Record] = []
    skipped, first_skipped = 0, None
    for number, row in enumerate(iter_rows(path, fields, format=format, split=split)):
        if number < skip:
            continue
        try:
            if row.values is None:
                raise ValueError(row.problem)
            records.append(make([_field_text(row.values, field) for field in fields], row.values))
        except ValueError as error:
            problem = f"{row.where}: {error}"
            if on_error == "raise":
                raise DataError(problem) from None
            skipped += 1
            first_skipped = first_skipped or problem
            continue
        if limit is not None and len(records) == limit:
            break
    if skipped:
        logger.warning("%s: skipped %d malformed record(s), kept %d; the first: %s",
                       path, skipped, len(records), first_skipped)
    if not records:
        why = (f"all {skipped} were malformed, the first: {first_skipped}" if skipped
               else f"none after the first {skip} (skip)" if skip else "it is empty")
        raise DataError(f"{path}: no records ({why})")
    return records
