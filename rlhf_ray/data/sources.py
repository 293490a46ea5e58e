"""Rows of a dataset file, each with where it came from: JSONL, Parquet, or a local `datasets` folder.

A row is a dict of field values, or the reason it could not be read (a line that is not JSON), so
that the loaders in `rlhf_ray.data.loading` can raise or skip it. Where a row came from reads as
`data/prefs.jsonl:17` (1-based line, as editors count) or `row 5 of x.parquet` (0-based, as
`table.slice(5, 1)` and `dataset[5]` count).

A field that the whole file lacks (a Parquet column, a `datasets` feature) is not a malformed record
but a wrong field name, and is always an error, naming the fields the file has.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf_ray.data.records import DataError

Format = Literal["jsonl", "parquet", "hf"]
FORMAT_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
# files `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Row:
    where: str  # "data/prefs.jsonl:17" or "row 5 of x.parquet"
    values: dict[str, Any] | None  # None when the row could not be read at all
    problem: str | None = None  # why it could not be read


def detect_format(path: str | os.PathLike) -> Format:
    """The format of `path`: by suffix for a file, `hf` for a folder that `save_to_disk` wrote."""
    path = Path(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return "hf"
        raise DataError(f"{path}: a folder, but not one that `datasets` save_to_disk wrote "
                        f"(none of {', '.join(HF_MARKERS)} in it)")
    suffix = path.suffix.lower()
    if suffix in FORMAT_SUFFIXES:
        return FORMAT_SUFFIXES[suffix]
    raise DataError(f"{path}: cannot tell the format from the suffix {suffix!r}; expected one of "
                    f"{', '.join(sorted(FORMAT_SUFFIXES))}, a `datasets` folder, or an explicit format")


def iter_rows(path: str | os.PathLike, fields: Sequence[str], format: Format | Literal["auto"] = "auto",
              split: str | None = None) -> Iterator[Row]:
    """Every row of the dataset at `path`, in file order. `fields` are those the caller will read: a
    columnar file must have them all, and only they are read from it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    format = detect_format(path) if format == "auto" else format
    if format == "jsonl":
        if path.is_dir():
            raise DataError(f"{path}: a folder, but the format is jsonl")
        return _jsonl_rows(path)
    if format == "parquet":
        if path.is_dir():
            raise DataError(f"{path}: a folder, but the format is parquet")
        return _parquet_rows(path, fields)
    if format == "hf":
        return _hf_rows(path, fields, split)
    raise DataError(f"{path}: unknown format {format!r}; expected jsonl, parquet or hf")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Row(where, None, f"not valid UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not line.strip():
                continue  # blank lines, such as a trailing one, are not records
            try:
                values = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                yield Row(where, None, f"not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(values, dict):
                yield Row(where, None, f"not a JSON object (got {type(values).__name__})")
                continue
            yield Row(where, values)


def _require_columns(path: Path, available: Sequence[str], fields: Sequence[str], kind: str) -> None:
    missing = [field for field in fields if field not in available]
    if missing:
        raise DataError(f"{path}: no {kind} {', '.join(map(repr, missing))} "
                        f"(it has {', '.join(map(repr, available))}); "
                        "set the field names in the dataset config")


def _parquet_rows(path: Path, fields: Sequence[str]) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    _require_columns(path, parquet.schema_arrow.names, fields, "column")
    batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=list(fields))
    return _numbered_rows((batch.to_pylist() for batch in batches), path.name)


def _numbered_rows(batches: Iterator[list[dict[str, Any]]], name: str) -> Iterator[Row]:
    index = 0
    for batch in batches:
        for values in batch:
            yield Row(f"row {index} of {name}", values)
            index += 1


def _hf_rows(path: Path, fields: Sequence[str], split: str | None) -> Iterator[Row]:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{path}: reading a `datasets` folder needs the `datasets` package (pip install datasets)")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - FileNotFoundError, ValueError, arrow errors
        raise DataError(f"{path}: not a folder that `datasets` can load ({error})") from error
    name = path.name
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{path}: a dataset with splits {', '.join(map(repr, splits))}; choose one with split")
            split = splits[0]
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (it has {', '.join(map(repr, splits))})")
        loaded, name = loaded[split], f"{name}[{split}]"
    elif split is not None:
        raise DataError(f"{path}: split {split!r} asked for, but the folder holds a single dataset without splits")
    _require_columns(path, loaded.column_names, fields, "field")
    batches = loaded.select_columns(list(fields)).with_format("arrow").iter(batch_size=_BATCH_ROWS)
    return _numbered_rows((batch.to_pylist() for batch in batches), name)
