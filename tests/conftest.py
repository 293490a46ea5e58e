"""Shared fixtures: tiny models and tokenizers built locally (no hub access anywhere)."""

import pytest

from rlhf_ray.models import build_tiny_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny GPT-2 causal LM and its word-level tokenizer, saved as a Hugging Face folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


@pytest.fixture
def tiny_tokenizer():
    """The built-in word-level tokenizer: <pad>=0, <eos>=1, <unk>=2."""
    return build_tiny_tokenizer()
