"""LoRA: the merge a rollout worker and the exported policy use is PEFT's own, and only adapters travel."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import LoraSettings
from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.lora import (
    AdapterMerger, adapter_payload, add_adapters, base_state_dict, is_adapter_payload, merged_state_dict,
    save_adapter_folder,
)

CASES = {"gpt2": LoraSettings(r=4, alpha=8.0, target_modules=["c_attn", "c_fc"]),  # Conv1D: in x out weights
         "llama": LoraSettings(r=4, alpha=16.0, target_modules=["q_proj", "v_proj"])}


def adapted(arch: str, seed: int = 1):
    """A tiny model in PEFT adapters whose B is not zero (a fresh adapter is the identity: nothing to check)."""
    model, tokenizer = build_tiny_model(arch, seed=0)
    peft_model = add_adapters(model, CASES[arch])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model, tokenizer


@pytest.mark.parametrize("arch", sorted(CASES))
def test_the_merge_is_pefts_merge_and_unload(arch):
    peft_model, _ = adapted(arch)
    lora = CASES[arch]
    state = peft_model.state_dict()
    payload = adapter_payload(state, lora.alpha / lora.r)
    assert is_adapter_payload(payload) and not is_adapter_payload(base_state_dict(state))
    plain, _ = build_tiny_model(arch, seed=0)
    merged = merged_state_dict(plain, base_state_dict(state), payload)
    expected = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_a_worker_merging_synced_adapters_holds_the_learners_merged_weights(arch):
    lora = CASES[arch]
    worker, _ = build_tiny_model(arch, seed=0)  # the rollout worker: the base weights
    merger = AdapterMerger(worker)
    for seed in (1, 2):  # two syncs: the second replaces the first's update, it does not add to it
        peft_model, _ = adapted(arch, seed)
        merger.apply(adapter_payload(peft_model.state_dict(), lora.alpha / lora.r))
        expected = peft_model.merge_and_unload().state_dict()
        for name, tensor in worker.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="layers the policy does not have"):
        merger.apply({"nowhere.lora_A": torch.zeros(1, 1), "nowhere.lora_B": torch.zeros(1, 1)})


def test_the_adapter_folder_loads_in_peft_and_answers_as_the_merged_policy(tmp_path):
    from peft import PeftModel

    peft_model, tokenizer = adapted("llama")
    base = tmp_path / "base"
    build_tiny_model("llama", seed=0)[0].save_pretrained(base)
    save_adapter_folder(tmp_path / "policy_adapter", peft_model.state_dict(), CASES["llama"], str(base))
    loaded = PeftModel.from_pretrained(build_tiny_model("llama", seed=0)[0], tmp_path / "policy_adapter")
    ids = tokenizer("the movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.merge_and_unload()(ids).logits, rtol=0, atol=1e-5)


def test_targets_the_model_does_not_have_are_named():
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        add_adapters(build_tiny_model("gpt2")[0], LoraSettings(target_modules=["q_proj"]))
