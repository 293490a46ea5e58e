"""Policies, reference models and tokenizers: loading, and tiny models built locally for tests.

Names are imported on first use, so `import envs` (which needs only tokenizers) stays cheap.
"""

_EXPORTS = {
    "BUILTIN_MODELS": "tiny", "ModelNotFoundError": "folders", "load_policy": "loading",
    "load_tokenizer": "loading", "resolve_model_path": "loading", "save_hf_folder": "folders",
    "build_tiny_model": "tiny", "build_tiny_tokenizer": "tiny", "save_tiny_model": "tiny",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"rlhf_ray.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rlhf_ray.models' has no attribute {name!r}")
