"""Forward passes over finished episodes: the layout the learner and the tests share.

A batch of episodes is packed as `[left-padded prompt | right-padded response]`:

    input_ids      (B, P + R)   pad . . p p p | r r r eos pad
    attention_mask (B, P + R)   0   0 0 1 1 1 | 1 1 1 1   0
    response_mask  (B, R)                     | 1 1 1 1   0

Prompts end at the same column P, so response token t of every row sits at column P + t and is
predicted by the logits at column P + t - 1. Position ids count real tokens only, as HF `generate`
does for left-padded prompts. In a dialogue the response holds the environment's messages too: they are
attended to, and `response_mask` is 0 on them (the episode's `action_mask`), so every loss, KL and
advantage counts the policy's tokens alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_ray.algorithms import logprobs_from_logits


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long
    response_mask: torch.Tensor  # (B, R) float, 1 for the policy's response tokens (EOS included)
    prompt_width: int  # P

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_ids(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_width:]

    def prompt_lengths(self) -> torch.Tensor:  # (B,)
        return self.attention_mask[:, :self.prompt_width].sum(-1)

    def select(self, index: torch.Tensor) -> "PackedBatch":
        """The rows `index`, without the columns none of them uses (the same logits, less padding)."""
        mask, responses = self.attention_mask[index], self.response_mask[index]
        first = self.prompt_width - int(mask[:, :self.prompt_width].sum(-1).max())
        end = self.prompt_width + max(1, int(mask[:, self.prompt_width:].sum(-1).max()))
        return PackedBatch(self.input_ids[index, first:end], mask[:, first:end],
                           responses[:, :end - self.prompt_width], self.prompt_width - first)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.response_mask.to(device), self.prompt_width)


def pack(episodes, pad_id: int) -> PackedBatch:
    """`pack_episodes` of finished episodes (`rlhf_ray.rollout.sampler.Episode`), action masks included."""
    return pack_episodes([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_id,
                         [e.action_mask for e in episodes])


def pack_episodes(prompt_ids: list, response_ids: list, pad_id: int, action_masks: list | None = None) -> PackedBatch:
    """Pack token-id sequences (lists or arrays) into the layout above. `action_masks`: per response, None or
    (R,) with 0 on the tokens the environment appended (a dialogue's)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses")
    action_masks = [None] * len(response_ids) if action_masks is None else action_masks
    batch = len(prompt_ids)
    prompt_width = max(len(p) for p in prompt_ids)
    response_width = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((batch, prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((batch, response_width), dtype=torch.float32)
    for row, (prompt, response, actions) in enumerate(zip(prompt_ids, response_ids, action_masks, strict=True)):
        p, r = len(prompt), len(response)
        # torch.tensor copies: episodes from the object store hold read-only arrays
        input_ids[row, prompt_width - p:prompt_width] = torch.tensor(np.asarray(prompt), dtype=torch.long)
        attention_mask[row, prompt_width - p:prompt_width + r] = 1
        if r:
            input_ids[row, prompt_width:prompt_width + r] = torch.tensor(np.asarray(response), dtype=torch.long)
            response_mask[row, :r] = 1.0 if actions is None else torch.tensor(np.asarray(actions), dtype=torch.float32)
    return PackedBatch(input_ids, attention_mask, response_mask, prompt_width)


def hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine, `AdaptersDisabled` or a PEFT model."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def keeps_logits(model_class: type) -> bool:
    """Whether the model's forward takes `logits_to_keep` (most HF causal LMs): the LM head then runs on the
    positions asked for only, not on the prompt's, whose logits no loss reads."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_logits(model, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits (B, R, V) predicting each response token, divided by the sampling temperature."""
    kept = batch.response_mask.shape[1] + 1  # the last prompt column and the response's
    extra = {"logits_to_keep": kept} if keeps_logits(type(hf_model(model))) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, **extra)
    logits = out.logits[:, -kept:-1, :]  # (B, R, V): columns P - 1 .. P + R - 2
    return logits.float() / temperature


def response_logprobs(model, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(response token t | prefix) (B, R) under `model`; zero where `response_mask` is 0."""
    return logprobs_from_logits(response_logits(model, batch, temperature), batch.response_ids) * batch.response_mask
