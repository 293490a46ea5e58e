"""The PPO update of one learner rank: experience from a shard of episodes, then K epochs.

Plain torch: the "engines" are anything with `__call__` (forward), `backward(loss)` and `step()`,
which DeepSpeed engines are and `TorchEngine` is for a single process; `Reducer` sums tensors over
the data-parallel ranks (the identity on one process). The same code therefore runs the
single-process reference computation in the tests and the sharded update in Ray Train workers.

Per iteration (Ziegler et al. 2019; Huang et al., "The N Implementation Details of RLHF with PPO"):
1. reference log-probs and critic values of the sampled tokens, with no gradient;
2. scores: reward scale, the missing-EOS penalty, then `r_t = -beta * KL_t` plus the score on the
   last response token (or the KL as a loss term, GRPO style);
3. advantages: GAE over response tokens, or critic-free GRPO / RLOO over groups of one prompt;
   whitened over the whole rollout batch across ranks;
4. `ppo.epochs` passes over shuffled minibatches: clipped policy loss (ratio against the
   behaviour log-probs recorded at sampling time) and clipped value loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from rlhf_ray.algorithms import (
    broadcast_to_tokens, explained_variance, gae, grpo_advantages, kl_estimate, kl_loss,
    kl_penalized_rewards, masked_entropy, masked_whiten, policy_loss, rloo_advantages,
    value_loss,
)
from rlhf_ray.config import PPOConfig
from rlhf_ray.models.forward import PackedBatch, pack_episodes, response_logits
from rlhf_ray.models.value import response_values


class Reducer:
    """Sums over data-parallel ranks; this base class is the single-process identity."""

    world_size = 1
    rank = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchEngine:
    """A model and its optimizer behind the slice of the DeepSpeed engine API the update uses."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None):
        self.module, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Experience:
    """One rank's shard of a rollout batch, ready for PPO; token tensors are (B, R)."""

    batch: PackedBatch
    old_logprobs: torch.Tensor  # behaviour log-probs recorded when sampling
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # None without a critic
    advantages: torch.Tensor
    returns: torch.Tensor | None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.response_mask

    def __len__(self) -> int:
        return self.batch.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PackedBatch):
                value = PackedBatch(value.input_ids[index], value.attention_mask[index],
                                    value.response_mask[index], value.prompt_width)
            elif value is not None:
                value = value[index]
            picked[f.name] = value
        return Experience(**picked)


def sequence_scores(rewards: np.ndarray, eos: np.ndarray, cfg: PPOConfig) -> torch.Tensor:
    """The task scores (B,) PPO optimises: scaled, and the missing-EOS penalty where set."""
    scores = torch.as_tensor(np.asarray(rewards, dtype=np.float32) * cfg.reward_scale)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(torch.as_tensor(np.asarray(eos, dtype=bool)), scores,
                             torch.tensor(cfg.missing_eos_penalty, dtype=torch.float32))
    return scores


def _global_mean(value_sum: torch.Tensor, count: torch.Tensor, reducer: Reducer) -> float:
    total = reducer.sum(torch.stack([value_sum.detach().float(), count.float()]))
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def make_experience(episodes, actor, critic, reference, cfg: PPOConfig, kl_coef: float,
                    temperature: float, pad_id: int, reducer: Reducer = Reducer()) -> tuple[Experience, dict]:
    """Experience and rollout statistics from this rank's episodes (whole prompt groups for GRPO/RLOO)."""
    batch = pack_episodes([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_id)
    mask = batch.response_mask  # (B, R)
    old_logprobs = torch.zeros_like(mask)
    for row, episode in enumerate(episodes):
        old_logprobs[row, : len(episode.behaviour_logprobs)] = torch.as_tensor(episode.behaviour_logprobs)
    device = _device_of(actor)
    batch, old_logprobs = batch.to(device), old_logprobs.to(device)
    mask = batch.response_mask
    ref_logits = response_logits(reference, batch, temperature)  # (B, R, V)
    ref_logprobs = torch.log_softmax(ref_logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    del ref_logits
    scores = sequence_scores([e.reward for e in episodes], [e.eos for e in episodes], cfg).to(device)  # (B,)

    kl_cfg = cfg.kl
    kl = torch.where(mask.bool(), kl_estimate(old_logprobs, ref_logprobs, kl_cfg.estimator), 0.0)  # (B, R)
    values = returns = None
    if cfg.advantage_estimator == "gae":
        # with the KL as a loss term (in_reward false) the reward is the score alone
        reward_kl_coef = kl_coef if kl_cfg.in_reward else 0.0
        rewards, _ = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, reward_kl_coef, kl_cfg.estimator)
        values = response_values(critic, batch)  # (B, R)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    else:
        sequence_returns = scores - (kl_coef * kl.sum(-1) if kl_cfg.in_reward else 0.0)  # (B,)
        estimator = grpo_advantages if cfg.advantage_estimator == "grpo" else rloo_advantages
        advantages = broadcast_to_tokens(estimator(sequence_returns, group_size=cfg.group_size), mask)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, reduce=reducer.sum)

    count = torch.tensor(float(len(episodes)), device=device)
    stats = {
        "rollout/reward_mean": _global_mean(scores.sum(), count, reducer),
        "rollout/response_len": _global_mean(mask.sum(), count, reducer),
        "rollout/eos_frac": _global_mean(torch.tensor(float(sum(e.eos for e in episodes))), count, reducer),
        "objective/kl": _global_mean(kl.sum(), count, reducer),  # per sequence, nats
        "objective/rlhf_reward": _global_mean(scores.sum() - kl_coef * kl.sum(), count, reducer),
        "objective/kl_coef": kl_coef,
    }
    return Experience(batch, old_logprobs, ref_logprobs, values, advantages, returns), stats


def _device_of(engine) -> torch.device:
    module = getattr(engine, "module", engine)
    return next(module.parameters()).device


def ppo_update(actor, critic, experience: Experience, cfg: PPOConfig, kl_coef: float, temperature: float,
               generator: torch.Generator, reducer: Reducer = Reducer()) -> dict:
    """`cfg.epochs` passes of clipped PPO over shuffled minibatches; returns mean statistics.

    `cfg.minibatch_size` counts episodes over all ranks; each rank takes its share of its shard.
    The losses are token means over the *global* minibatch: each rank scales its local token mean
    by (local tokens x ranks / global tokens) before the engines average gradients over ranks.
    """
    local_minibatch = cfg.minibatch_size // reducer.world_size
    if len(experience) % local_minibatch:
        raise ValueError(f"{len(experience)} episodes on this rank do not split into minibatches of {local_minibatch}")
    totals: dict[str, float] = {}
    steps = 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(experience), generator=generator)
        for start in range(0, len(experience), local_minibatch):
            mb = experience.select(order[start:start + local_minibatch].to(experience.mask.device))
            mask = mb.mask
            local_tokens = mask.sum()
            global_tokens = reducer.sum(local_tokens.detach().clone())
            scale = local_tokens * reducer.world_size / global_tokens

            # Policy loss
            logits = response_logits(actor, mb.batch, temperature)  # (b, R, V)
            logprobs = torch.log_softmax(logits, -1).gather(-1, mb.batch.response_ids.unsqueeze(-1)).squeeze(-1)
            pg_loss, pg_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, cfg.clip_eps, cfg.dual_clip)
            entropy = masked_entropy(logits, mask)
            loss = pg_loss - cfg.entropy_coef * entropy
            if not cfg.kl.in_reward:
                loss = loss + kl_coef * kl_loss(logprobs, mb.ref_logprobs, mask, cfg.kl.estimator)
            actor.backward(loss * scale)
            actor.step()
            step_stats = {"policy/loss": pg_loss.detach(), "objective/entropy": entropy.detach(),
                          "policy/clipfrac": pg_stats["clipfrac"], "policy/approxkl": pg_stats["approxkl"],
                          "policy/ratio_mean": pg_stats["ratio_mean"]}

            # Value loss
            if critic is not None:
                values = response_values(critic, mb.batch)  # (b, R)
                vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, cfg.value_clip_eps)
                critic.backward(cfg.vf_coef * vf_loss * scale)
                critic.step()
                step_stats.update({"val/vf_loss": vf_loss.detach(), "val/clipfrac": vf_stats["vf_clipfrac"]})

            for name, value in step_stats.items():  # token-weighted means over the global minibatch
                totals[name] = totals.get(name, 0.0) + _global_mean(value * local_tokens, local_tokens, reducer)
            steps += 1
    stats = {name: total / steps for name, total in totals.items()}
    if experience.values is not None:
        stats["val/explained_variance"] = explained_variance(experience.values, experience.returns,
                                                             experience.mask).item()
    return stats
