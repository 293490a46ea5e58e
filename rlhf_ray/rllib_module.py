"""RLlib glue for the text-generation env: a small token-level actor-critic RLModule and an env creator.

`TokenGRUModule` is a `TorchRLModule` with RLlib's `ValueFunctionAPI`, so RLlib's PPO (new API
stack) can train it on `rlhf_ray/TextGeneration-v0`: embed the token ids, run a GRU over them, take
the GRU output at the last observed token (`length - 1`), and read the next-token logits and the
value from it. It is the smallest model that sees the whole prefix in order; a stand-in for a causal
LM with a value head (Ziegler et al. 2019), not a language model.

The env's observation is a Dict {"input_ids": (L,), "length": (), "prompt_length": ()}. RLlib 2.60's
default env-to-module and learner connector pipelines do not flatten observations (flattening is the
opt-in `FlattenObservations` connector), so the module receives the Dict as a dict of tensors
(`batch[Columns.OBS]["input_ids"]` of shape (B, L), int64) and embeds the ids itself; one-hot
flattening of L token ids over the vocabulary would only make a large, sparse float vector.

    from ray import tune
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from rlhf_ray.rllib_module import TokenGRUModule, make_text_generation_env

    tune.register_env("rlhf_ray/TextGeneration-v0", make_text_generation_env)
    config = (PPOConfig().environment("rlhf_ray/TextGeneration-v0", env_config={"max_new_tokens": 8})
              .rl_module(rl_module_spec=RLModuleSpec(module_class=TokenGRUModule,
                                                     model_config={"embedding_dim": 32, "hidden_dim": 64})))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn


@dataclass(frozen=True)
class TokenGRUConfig:
    """Sizes of `TokenGRUModule`; pass them as `RLModuleSpec(model_config={...})`."""

    embedding_dim: int = 32
    hidden_dim: int = 64
    policy_head_init_std: float = 0.01  # near-uniform first policy, as CleanRL's `Agent` (std=0.01 on the actor)

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any] | None) -> TokenGRUConfig:
        # RLlib merges the algorithm's default model config (fcnet_hiddens, ...) into the module's;
        # only this module's own keys are read
        own = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (model_config or {}).items() if key in own})


def make_text_generation_env(env_config: Mapping[str, Any] | None = None) -> gym.Env:
    """An env creator for `tune.register_env`: `env_config` holds `TextGenerationEnv` keyword arguments.

    RLlib calls it with an `EnvContext` (a dict of `env_config`) for each sub-env of its (sync)
    vector env, or with `num_envs` added where `gym_env_vectorize_mode="vector_entry_point"`, which
    gets the array-based `TextGenerationVectorEnv`.
    """
    from envs import TextGenerationEnv, TextGenerationVectorEnv  # the env package knows nothing of Ray

    kwargs = dict(env_config or {})
    if "num_envs" in kwargs:
        return TextGenerationVectorEnv(**kwargs)
    return TextGenerationEnv(**kwargs)


class TokenGRUModule(TorchRLModule, ValueFunctionAPI):
    """Next-token policy and value from a GRU over the observed token ids (`TokenGRUConfig` sizes)."""

    def setup(self):
        super().setup()
        self.sizes = TokenGRUConfig.from_model_config(self.model_config)
        obs_space, action_space = self.observation_space, self.action_space
        if not isinstance(obs_space, gym.spaces.Dict) or not {"input_ids", "length"} <= set(obs_space.spaces):
            raise ValueError(
                f"TokenGRUModule needs the text env's Dict observation with 'input_ids' and 'length', got "
                f"{obs_space}; if it is a flat Box, a FlattenObservations connector flattened it: leave it out")
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"TokenGRUModule needs a Discrete action space (token ids), got {action_space}")
        # ids seen in observations and ids the policy emits share one embedding table
        num_tokens = max(int(obs_space["input_ids"].high.max()) + 1, int(action_space.n))

        self.token_embedding = nn.Embedding(num_tokens, self.sizes.embedding_dim)
        self.gru = nn.GRU(self.sizes.embedding_dim, self.sizes.hidden_dim, batch_first=True)
        self.policy_head = nn.Linear(self.sizes.hidden_dim, int(action_space.n))
        self.value_head = nn.Linear(self.sizes.hidden_dim, 1)
        nn.init.normal_(self.policy_head.weight, std=self.sizes.policy_head_init_std)
        nn.init.zeros_(self.policy_head.bias)

    def encode(self, observations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The GRU output at the last observed token of each row, (B, H); zeros for an empty row."""
        input_ids = observations["input_ids"].long()  # (B, L) right-padded
        length = observations["length"].long().reshape(-1)  # (B,)
        # the padding after the longest row in the batch can't affect any last token: don't run over it
        steps = max(int(length.max()), 1) if length.numel() else 1
        embedded = self.token_embedding(input_ids[:, :steps])  # (B, T, E)
        outputs, _ = self.gru(embedded)  # (B, T, H), causal: position t has seen tokens 0..t only
        last = (length - 1).clamp(min=0)  # (B,)
        hidden = outputs[torch.arange(outputs.shape[0], device=outputs.device), last]  # (B, H)
        return hidden * (length > 0).unsqueeze(-1).to(hidden.dtype)  # (B, H)

    def _observations(self, batch: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        observations = batch[Columns.OBS]
        if not isinstance(observations, Mapping):
            raise ValueError(
                f"TokenGRUModule expects batch[{Columns.OBS!r}] to be the Dict observation (a dict of tensors), "
                f"got {type(observations).__name__}; a FlattenObservations connector flattens it: leave it out")
        return observations

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Inference and exploration: next-token logits (B, V)."""
        hidden = self.encode(self._observations(batch))
        return {Columns.ACTION_DIST_INPUTS: self.policy_head(hidden)}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Training: logits (B, V) and the embeddings (B, H), which PPO hands back to `compute_values`."""
        hidden = self.encode(self._observations(batch))
        return {Columns.ACTION_DIST_INPUTS: self.policy_head(hidden), Columns.EMBEDDINGS: hidden}

    def compute_values(self, batch: dict[str, Any], embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Value estimates (B,) (RLlib's `ValueFunctionAPI`: the last dim squeezed out)."""
        if embeddings is None:
            embeddings = self.encode(self._observations(batch))
        return self.value_head(embeddings).squeeze(-1)  # (B,)
