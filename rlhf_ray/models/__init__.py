"""Policies, reference models and tokenizers: loading, and tiny models built locally for tests."""

from rlhf_ray.models.loading import BUILTIN_MODELS, ModelNotFoundError, load_policy, load_tokenizer, resolve_model_path
from rlhf_ray.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model

__all__ = [
    "BUILTIN_MODELS", "ModelNotFoundError", "build_tiny_model", "build_tiny_tokenizer",
    "load_policy", "load_tokenizer", "resolve_model_path", "save_tiny_model",
]
