"""The critic: a transformer backbone with a scalar value head over every position.

The head is initialised to zero, as in lm-human-preferences (Ziegler et al. 2019): the critic
starts by predicting 0 everywhere and learns the returns, instead of starting from noise.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from rlhf_ray.models.forward import PackedBatch


def hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"cannot find the hidden size of a {type(config).__name__}")


class ValueModel(nn.Module):
    """backbone (AutoModel) + Linear(hidden, 1): values (B, T) for every position."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size(backbone.config), 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32) -> "ValueModel":
        """A critic whose backbone is the transformer of the causal LM (or RM) at `path`."""
        config = AutoConfig.from_pretrained(path)
        return cls(AutoModel.from_pretrained(path, config=config, dtype=dtype))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        return self.value_head(out.last_hidden_state).squeeze(-1)  # (B, T)


def response_values(critic, batch: PackedBatch) -> torch.Tensor:
    """V(prefix before response token t) (B, R), aligned with `forward.response_logprobs`."""
    values = critic(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids)  # (B, P + R)
    return values[:, batch.prompt_width - 1:-1].float() * batch.response_mask
