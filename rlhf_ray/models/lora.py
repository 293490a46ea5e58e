"""LoRA adapters (PEFT) on the learner's policy, and the one merge every other place uses.

With `model.lora` the learner wraps the policy in PEFT (`add_adapters`): only the adapters train, and the
frozen reference is the same model with its adapters disabled, not a second copy. What leaves the learner
is small:

- a weight sync sends `adapter_payload`: per adapted layer `<layer>.lora_A` (r x in) and `<layer>.lora_B`
  (out x r) already multiplied by the scaling alpha / r, under the plain model's layer names;
- a rollout worker keeps the base weights W0 of the adapted layers (`AdapterMerger`) and sets
  W = W0 + B A (transposed for GPT-2's `Conv1D`, which stores in x out), exactly what PEFT's
  `merge_and_unload` gives;
- the exported policy is that merged model as a plain Hugging Face folder (`merged_state_dict`), with
  the adapter folder beside it (`save_adapter_folder`) for PEFT users.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
_ADAPTER = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])\.default\.weight")
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def add_adapters(model: torch.nn.Module, lora, trainable: tuple[str, ...] = (), seed: int = 0) -> torch.nn.Module:
    """`model` wrapped in PEFT LoRA adapters of `lora` (the config's `LoraSettings`); only they train, and
    the modules named in `trainable` in full (a reward model's new score head). The adapters' random start
    (A; B is 0) comes from `seed` alone, so every learner rank, and a rerun, starts from the same adapters.

    No LoRA dropout: the learner turns every dropout off so that its log-probs match the sampler's
    (PPO_DETAILS.md)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                     target_modules=targets, bias="none"))
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules: {err}") from None
    for name in trainable:  # left as plain parameters (no PEFT wrapper): they keep their names
        model.get_submodule(PEFT_PREFIX + name).requires_grad_(True)
    return model


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_payload(peft_state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """What a weight sync sends: `<layer>.lora_A` and `<layer>.lora_B` x `scaling`, plain layer names."""
    payload = {}
    for name, tensor in peft_state.items():
        match = _ADAPTER.fullmatch(name)
        if match:
            layer, kind = match.groups()
            payload[f"{layer}.{kind}"] = tensor * scaling if kind == "lora_B" else tensor
    return payload


def is_adapter_payload(state: dict) -> bool:
    return bool(state) and all(name.endswith(ADAPTER_SUFFIXES) for name in state)


def base_state_dict(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict inside a PEFT model's: prefixes and `base_layer` dropped, adapters left out."""
    return {name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): tensor
            for name, tensor in peft_state.items() if not is_adapter_parameter(name)}


def layer_delta(layer: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B A in the layout of `layer.weight` (B already scaled): transposed for GPT-2's Conv1D (in x out)."""
    from transformers.pytorch_utils import Conv1D

    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)  # (out, in)
    return delta.T if isinstance(layer, Conv1D) else delta


def merged_state_dict(model: torch.nn.Module, base: dict[str, torch.Tensor],
                      payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` (a plain state dict of `model`'s architecture) with every adapted layer's weight replaced by
    W0 + B A: the weights PEFT's `merge_and_unload` gives, as a state dict `model` loads."""
    merged = dict(base)
    layers = dict(model.named_modules())
    for name in payload:
        if name.endswith(".lora_A"):
            layer = name.removesuffix(".lora_A")
            weight = base[f"{layer}.weight"]
            delta = layer_delta(layers[layer], payload[name], payload[f"{layer}.lora_B"])
            merged[f"{layer}.weight"] = (weight.to(torch.float32) + delta).to(weight.dtype)
    return merged


def merge_adapters(model: torch.nn.Module, peft_state: dict[str, torch.Tensor], lora) -> dict[str, torch.Tensor]:
    """A whole PEFT state dict (base and adapters) as the merged plain state dict `model` loads."""
    return merged_state_dict(model, base_state_dict(peft_state), adapter_payload(peft_state, lora.alpha / lora.r))


class AdapterMerger:
    """A rollout worker's side of the LoRA sync: its model keeps W0 of every adapted layer aside (taken at
    the first sync, when the worker still holds the base weights) and takes W0 + B A at each sync."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base: dict[str, torch.Tensor] = {}  # layer name -> W0

    def apply(self, payload: dict[str, torch.Tensor]) -> None:
        layers = dict(self.model.named_modules())
        unknown = sorted({n.rsplit(".", 1)[0] for n in payload} - set(layers))
        if unknown:
            raise ValueError(f"adapters for layers the policy does not have: {unknown[:5]}")
        with torch.no_grad():
            for name in payload:
                if not name.endswith(".lora_A"):
                    continue
                layer_name = name.removesuffix(".lora_A")
                layer = layers[layer_name]
                if layer_name not in self.base:
                    self.base[layer_name] = layer.weight.detach().clone()
                base = self.base[layer_name]
                delta = layer_delta(layer, payload[name], payload[f"{layer_name}.lora_B"])
                layer.weight.copy_((base.to(torch.float32) + delta.to(base.device)).to(base.dtype))


def save_adapter_folder(path: Path, peft_state: dict[str, torch.Tensor], lora, base_model: str) -> None:
    """A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
    `PeftModel.from_pretrained(base, path)` loads; written to a temporary folder and renamed."""
    import shutil

    from peft import LoraConfig
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets, bias="none",
                        base_model_name_or_path=base_model, task_type="CAUSAL_LM")
    config.save_pretrained(str(tmp))
    tensors = {name.replace(".default.", "."): tensor.contiguous()
               for name, tensor in peft_state.items() if is_adapter_parameter(name)}
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
