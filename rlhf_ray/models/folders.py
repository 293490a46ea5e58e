"""Model folders on disk: where built and converted models are cached, the error for a model that is not
there, and the one way a Hugging Face folder is written.

Every folder this project writes (the PPO policy and its checkpoint copies, the SFT and reward-model
stage outputs, built-in tiny models, GGUF conversions) goes through `save_hf_folder`: it is built in a
sibling folder and renamed into place, so a reader (a resumed run, `rlhf-ray serve`, a rollout worker
that starts at the same time) finds either the whole folder or none of it. Standard library only, so
`tiny`, `hub` and `loading` can all sit above it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from rlhf_ray.errors import UserError


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name that is neither a local Hugging Face folder nor a known model."""


def cache_dir() -> Path:
    """Where built-in and converted models are kept (`RLHF_RAY_CACHE`, else ~/.cache/rlhf_ray)."""
    return Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf_ray"))


def is_model_folder(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def save_hf_folder(path: str | os.PathLike, model, tokenizer, files: Mapping[str, str] | None = None, *,
                   staging: Path | None = None, replace: bool = True) -> Path:
    """`model` and `tokenizer` (`save_pretrained`) as a Hugging Face folder at `path`, atomically; returns `path`.

    `files` (name: text) are written after the model, in order, so the last one can mark the folder
    complete (a stage's `summary.json`). Everything goes into `staging` (by default a fresh hidden sibling
    of `path`; a caller that has put files there already passes its own), which then replaces `path`.
    `replace=False` is for processes that may build the same cached model at once: a complete folder
    that another one renamed into place first is kept, and this one's is dropped.
    """
    path = Path(path)
    if replace and path.is_dir() and any(path.iterdir()) and not is_model_folder(path):
        raise FileExistsError(f"{path} holds files but no model (no config.json); not replacing it")
    staging = staging or path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            staging.rename(path)
        except OSError:  # `path` appeared meanwhile: another process finished first
            if replace or not is_model_folder(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
