"""Load a `RunConfig` from YAML with dotted command-line overrides, and fail clearly.

    load_config("experiments/quickstart.yaml", ["rollout.batch_size=64", "seed=3"])

Overrides are `dotted.key=value`; the value is read as YAML (`64` is an int, `[a, b]` a list,
`null` None). An unknown key, a value of the wrong type or a missing file raises `ConfigError`,
whose message names the key and suggests the nearest known key when there is one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_ray.config.schema import RunConfig
from rlhf_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the file, key and what was expected."""


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, prefix + name + "."))
    return keys


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(RunConfig), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'{_suggestion(key)}")
        elif not key or isinstance(item["input"], dict):  # a check across several keys
            lines.append(f"{source}: {key + ': ' if key else ''}{item['msg'].removeprefix('Value error, ')}")
        else:
            got = f" (got {item['input']!r})" if item["type"] != "missing" else ""
            lines.append(f"{source}: '{key}': {item['msg']}{got}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`'a.b=3'` -> (['a', 'b'], 3)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of `data` with each `dotted.key=value` set; unknown keys are reported by validation."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(f"override '{'.'.join(path)}': '{prefix}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The run configuration in `path` (YAML; None for the defaults) with `overrides` applied."""
    source = str(path) if path is not None else "defaults"
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    if overrides:
        source += " + overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved configuration as YAML, loadable by `load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
