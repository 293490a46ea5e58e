"""Policies, reference models and tokenizers: loading, and tiny models built locally for tests.

Names are imported on first use, so `import envs` (which needs only tokenizers) stays cheap.
"""

from rlhf_ray.lazy import lazy_exports

_EXPORTS = {
    "BUILTIN_MODELS": "tiny", "ModelNotFoundError": "folders", "load_policy": "loading",
    "load_tokenizer": "loading", "resolve_model_path": "loading", "parameters_digest": "loading", "save_hf_folder": "folders",
    "build_tiny_model": "tiny", "build_tiny_tokenizer": "tiny", "save_tiny_model": "tiny",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
