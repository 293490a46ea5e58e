"""The PPO update of one learner rank: experience from a shard of episodes, then K epochs.

Plain torch: the "engines" are anything with `__call__` (forward), `backward(loss)` and `step()`,
which DeepSpeed engines are and `TorchEngine` is for a single process; a `Reducer` (`learner/distributed.py`)
sums tensors over the data-parallel ranks (the identity on one process). The same code therefore runs the
single-process reference computation in the tests and the sharded update in Ray Train workers.

Per iteration (Ziegler et al. 2019; Huang et al., "The N Implementation Details of RLHF with PPO"):
1. reference log-probs (skipped while the KL coefficient is 0: nothing would use them) and critic values
   of the sampled tokens, with no gradient;
2. scores: reward scale, the missing-EOS penalty, then `r_t = -beta * KL_t` plus the score on the
   last response token (or the KL as a loss term, GRPO style);
3. advantages: GAE over response tokens, or critic-free GRPO / RLOO over groups of one prompt;
   whitened over the whole rollout batch across ranks;
4. `ppo.epochs` passes over shuffled minibatches: clipped policy loss (ratio against the
   behaviour log-probs recorded at sampling time) and clipped value loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlhf_ray.algorithms import (
    broadcast_to_tokens, explained_variance, gae, grpo_advantages, gspo_policy_loss, kl_estimate, kl_loss,
    kl_penalized_rewards, logprobs_from_logits, masked_entropy, masked_whiten, overlong_penalty, policy_loss,
    reinforce_pp_advantages, rloo_advantages, value_loss,
)
from rlhf_ray.config import PPOConfig
from rlhf_ray.learner.distributed import Reducer
from rlhf_ray.models.forward import PackedBatch, pack, response_logits, response_logprobs
from rlhf_ray.models.value import response_values


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
    ref_logprobs: torch.Tensor | None  # None: the KL coefficient is 0, the reference pass was skipped
    values: torch.Tensor | None  # None without a critic
    advantages: torch.Tensor
    returns: torch.Tensor | None
    # off-policy episodes: the sampler's log-probs, while old_logprobs are the proximal policy's (the
    # learner's at the start of the update); None when the episodes came from that policy
    behaviour_logprobs: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.response_mask

    def __len__(self) -> int:
        return self.batch.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows `index`, trimmed to the columns they use (the same logits, less padding)."""
        batch = self.batch.select(index)
        responses = batch.response_mask.shape[1]
        return Experience(batch, *(
            None if tensor is None else tensor[index, :responses]
            for tensor in (self.old_logprobs, self.ref_logprobs, self.values, self.advantages, self.returns,
                           self.behaviour_logprobs)))


def micro_batches(prompt_lengths: np.ndarray, response_lengths: np.ndarray, max_tokens: int | None,
                  reducer: Reducer = Reducer()) -> list[np.ndarray]:
    """Rows of a minibatch grouped into micro-batches of at most `max_tokens` padded tokens each.

    A micro-batch costs rows x (its longest prompt + its longest response), the width it is trimmed to, so
    rows are taken longest first and a micro-batch closes when the next row would pass the budget (a row
    longer than the budget goes alone). Every rank runs as many micro-batches as the rank that needs the
    most (ZeRO reduces gradients in every backward and ZeRO-3 gathers parameters in every forward, so
    the ranks' passes must pair up): a rank that needs fewer splits its largest micro-batches, and gets
    empty ones (to run with zero weight) only when it has fewer rows than micro-batches.
    None: the whole minibatch as one micro-batch.
    """
    rows = len(prompt_lengths)
    if max_tokens is None:
        groups = [np.arange(rows)]
    else:
        groups, current, width_p, width_r = [], [], 0, 0
        for row in np.argsort(-(prompt_lengths + response_lengths), kind="stable"):
            p, r = max(width_p, prompt_lengths[row]), max(width_r, response_lengths[row], 1)
            if current and (len(current) + 1) * (p + r) > max_tokens:
                groups.append(np.array(current))
                current, p, r = [], prompt_lengths[row], max(response_lengths[row], 1)
            current.append(row)
            width_p, width_r = p, r
        groups.append(np.array(current, dtype=np.int64))
    count = int(reducer.max(torch.tensor(len(groups))).item())
    while len(groups) < count:
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        if len(groups[largest]) < 2:
            groups.append(np.zeros(0, dtype=np.int64))
            continue
        half = len(groups[largest]) // 2
        groups[largest:largest + 1] = [groups[largest][:half], groups[largest][half:]]
    return groups


def micro_batch_rows(groups: list[np.ndarray], device) -> list[tuple[torch.Tensor, float]]:
    """(row index, weight) per group: an empty group runs row 0 with weight 0, keeping the ranks paired."""
    return [(torch.as_tensor(rows, device=device), 1.0) if len(rows) else (torch.zeros(1, dtype=torch.long,
                                                                                         device=device), 0.0)
            for rows in groups]


def sequence_scores(rewards: np.ndarray, eos: np.ndarray, cfg: PPOConfig, lengths: np.ndarray | None = None,
                    max_new_tokens: int | None = None) -> torch.Tensor:
    """The task scores (B,) PPO optimises: scaled, the missing-EOS penalty where set, and DAPO's overlong
    shaping (`cfg.overlong_buffer`) of responses of `lengths` tokens out of `max_new_tokens`."""
    scores = torch.as_tensor(np.asarray(rewards, dtype=np.float32) * cfg.reward_scale)
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(torch.as_tensor(np.asarray(eos, dtype=bool)), scores,
                             torch.tensor(cfg.missing_eos_penalty, dtype=torch.float32))
    if cfg.overlong_buffer is not None:
        if lengths is None or max_new_tokens is None:
            raise ValueError("ppo.overlong_buffer needs the response lengths and rollout.max_new_tokens")
        scores = scores + overlong_penalty(torch.as_tensor(np.asarray(lengths)), max_new_tokens, cfg.overlong_buffer,
                                           cfg.overlong_penalty_factor)
    return scores


def per_turn_rewards(episodes, mask: torch.Tensor, reward_scale: float) -> torch.Tensor | None:
    """(B, R) the dialogue episodes' per-turn rewards (`Episode.turn_rewards`) times `reward_scale`; None for
    episodes of one prompt and one response. Decided by the kind of episode, not by whether a turn was rewarded,
    so that every rank of a run logs the same statistics (their reduction is a collective)."""
    if all(e.action_mask is None for e in episodes):
        return None
    rewards = torch.zeros_like(mask)
    for row, episode in enumerate(episodes):
        if episode.turn_rewards is not None:
            rewards[row, :len(episode.turn_rewards)] = torch.as_tensor(episode.turn_rewards) * reward_scale
    return rewards


@torch.no_grad()
def make_experience(episodes, actor, critic, reference, cfg: PPOConfig, kl_coef: float,
                    temperature: float, pad_id: int, reducer: Reducer = Reducer(),
                    max_tokens: int | None = None, proximal: bool = False,
                    max_new_tokens: int | None = None) -> tuple[Experience, dict]:
    """Experience and rollout statistics from this rank's episodes (whole prompt groups for GRPO/RLOO).

    The reference and critic passes run in micro-batches of at most `max_tokens` padded tokens. With
    `kl_coef` 0 the reference pass is skipped (no KL term to compute; `objective/kl` is then not logged:
    the held-out evaluation reports the KL to the reference, `train.eval_every`).
    `proximal`: the episodes were sampled by an older policy than the actor's (overlapped rollouts), so
    the actor's own log-probs are computed too, as the proximal policy of decoupled PPO (`policy_loss`);
    every rank must pass the same value (the pass is a collective under ZeRO-3).
    """
    batch = pack(episodes, pad_id)
    mask = batch.response_mask  # (B, R)
    old_logprobs = torch.zeros_like(mask)
    for row, episode in enumerate(episodes):
        old_logprobs[row, : len(episode.behaviour_logprobs)] = torch.tensor(episode.behaviour_logprobs)
    device = _device_of(actor)
    batch, old_logprobs = batch.to(device), old_logprobs.to(device)
    mask = batch.response_mask
    groups = micro_batches(np.array([len(e.prompt_ids) for e in episodes]),
                           np.array([len(e.response_ids) for e in episodes]), max_tokens, reducer)
    ref_logprobs = torch.zeros_like(mask) if kl_coef > 0 else None  # (B, R)
    critic_values = torch.zeros_like(mask) if cfg.advantage_estimator == "gae" else None
    proximal_logprobs = torch.zeros_like(mask) if proximal else None
    for index, _ in micro_batch_rows(groups, device):  # a weight-0 pass rewrites row 0 with the same values
        micro = batch.select(index)
        width = micro.response_mask.shape[1]
        if ref_logprobs is not None:
            ref_logprobs[index, :width] = response_logprobs(reference, micro, temperature)
        if critic_values is not None:
            critic_values[index, :width] = response_values(critic, micro) * micro.response_mask
        if proximal_logprobs is not None:
            proximal_logprobs[index, :width] = response_logprobs(actor, micro, temperature)
    scores = sequence_scores([e.reward for e in episodes], [e.eos for e in episodes], cfg,
                             [len(e.response_ids) for e in episodes], max_new_tokens).to(device)  # (B,)
    turn_rewards = per_turn_rewards(episodes, mask, cfg.reward_scale)  # (B, R) or None: a dialogue's turn rewards

    kl_cfg = cfg.kl
    kl = (torch.zeros_like(mask) if ref_logprobs is None
          else torch.where(mask.bool(), kl_estimate(old_logprobs, ref_logprobs, kl_cfg.estimator), 0.0))  # (B, R)
    values = returns = None
    # with the KL as a loss term (in_reward false) the reward is the score alone
    reward_kl_coef = kl_coef if kl_cfg.in_reward else 0.0
    if cfg.advantage_estimator in ("gae", "reinforce_pp"):
        rewards, _ = kl_penalized_rewards(scores, old_logprobs, old_logprobs if ref_logprobs is None else ref_logprobs,
                                          mask, reward_kl_coef, kl_cfg.estimator)
        if turn_rewards is not None:  # each on the last token of the turn it rewards
            rewards = rewards + turn_rewards
        if cfg.advantage_estimator == "gae":
            values = critic_values  # (B, R)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        else:  # REINFORCE++: whitened over the whole batch already
            advantages = reinforce_pp_advantages(rewards, mask, reduce=reducer.sum)
    else:
        sequence_returns = scores - reward_kl_coef * kl.sum(-1)  # (B,)
        if turn_rewards is not None:
            sequence_returns = sequence_returns + turn_rewards.sum(-1)
        estimator = {"grpo": grpo_advantages, "rloo": rloo_advantages,
                     "dr_grpo": lambda r, group_size: grpo_advantages(r, group_size, scale_by_std=False)}
        sequence_advantages = estimator[cfg.advantage_estimator](sequence_returns, group_size=cfg.group_size)
        advantages = broadcast_to_tokens(sequence_advantages, mask)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, reduce=reducer.sum)

    count = len(episodes)
    stats = {
        "rollout/reward_mean": reducer.mean(scores.sum(), count),
        "rollout/response_len": reducer.mean(mask.sum(), count),
        "rollout/eos_frac": reducer.mean(sum(e.eos for e in episodes), count),
        "objective/kl_coef": kl_coef,
    }
    if turn_rewards is not None:
        stats["rollout/turn_reward_mean"] = reducer.mean(turn_rewards.sum(), count)  # per episode, scaled
    if ref_logprobs is not None:
        stats["objective/kl"] = reducer.mean(kl.sum(), count)  # per sequence, nats
        stats["objective/rlhf_reward"] = reducer.mean(scores.sum() - kl_coef * kl.sum(), count)
    if proximal_logprobs is not None:
        return Experience(batch, proximal_logprobs, ref_logprobs, values, advantages, returns, old_logprobs), stats
    return Experience(batch, old_logprobs, ref_logprobs, values, advantages, returns), stats


def _device_of(engine) -> torch.device:
    module = getattr(engine, "module", engine)
    return next(module.parameters()).device


def ppo_update(actor, critic, experience: Experience, cfg: PPOConfig, kl_coef: float, temperature: float,
               generator: torch.Generator, reducer: Reducer = Reducer(), max_tokens: int | None = None,
               norm_length: int | None = None) -> dict:
    """`cfg.epochs` passes of clipped PPO over shuffled minibatches; returns mean statistics.

    `cfg.minibatch_size` counts episodes over all ranks; each rank takes its share of its shard, in
    micro-batches of at most `max_tokens` padded tokens (`micro_batches`), whose gradients add up
    before the one optimizer step of the minibatch. The losses are means over the *global* minibatch:
    each micro-batch scales its mean by (its units x ranks / global units) before the engines average
    gradients over ranks, where the units are tokens for token means (the value, KL and entropy terms, and
    the policy loss under `token-mean`) and sequences for the policy loss's sequence means
    (`cfg.loss_aggregation` seq-mean-*, and GSPO). `norm_length`: the constant of seq-mean-token-sum-norm
    (the generation budget).
    """
    aggregation = "seq-mean-token-mean" if cfg.policy_loss == "gspo" else cfg.loss_aggregation
    per_sequence = aggregation != "token-mean"
    local_minibatch = cfg.minibatch_size // reducer.world_size
    if len(experience) % local_minibatch:
        raise ValueError(f"{len(experience)} episodes on this rank do not split into minibatches of {local_minibatch}")
    totals: dict[str, float] = {}
    steps = 0
    gap = LogprobGap()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(experience), generator=generator)
        for start in range(0, len(experience), local_minibatch):
            index = order[start:start + local_minibatch]
            rows = index.to(experience.mask.device)
            local_tokens = experience.mask[rows].sum()
            global_tokens = reducer.sum(local_tokens.detach().clone())
            global_sequences = reducer.sum(torch.tensor(float(len(rows)), dtype=local_tokens.dtype))
            groups = micro_batches(experience.batch.prompt_lengths()[rows].cpu().numpy(),
                                   experience.mask[rows].sum(-1).long().cpu().numpy(), max_tokens, reducer)
            sums: dict[str, torch.Tensor] = {}  # token-weighted sums of this rank's statistics
            for micro_rows, weight in micro_batch_rows([index.numpy()[group] for group in groups], rows.device):
                mb = experience.select(micro_rows)
                mask = mb.mask
                tokens, sequences = mask.sum() * weight, len(micro_rows) * weight
                scale = tokens * reducer.world_size / global_tokens
                pg_scale = sequences * reducer.world_size / global_sequences if per_sequence else scale

                # Policy loss
                logits = response_logits(actor, mb.batch, temperature)  # (b, r, V)
                logprobs = logprobs_from_logits(logits, mb.batch.response_ids)  # logits are already / temperature
                if cfg.policy_loss == "gspo":  # a group estimator's advantage: the same on every token of a row
                    sequence_advantages = (mb.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                    pg_loss, pg_stats = gspo_policy_loss(logprobs, mb.old_logprobs, sequence_advantages, mask,
                                                         cfg.clip_eps, cfg.clip_eps_high or cfg.clip_eps)
                else:
                    pg_loss, pg_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, cfg.clip_eps,
                                                    cfg.dual_clip, mb.behaviour_logprobs, cfg.behaviour_weight_cap,
                                                    cfg.clip_eps_high, aggregation, norm_length)
                entropy = masked_entropy(logits, mask)
                loss = -cfg.entropy_coef * entropy
                if not cfg.kl.in_reward and mb.ref_logprobs is not None:
                    loss = loss + kl_coef * kl_loss(logprobs, mb.ref_logprobs, mask, cfg.kl.estimator)
                if steps == 0 and mb.behaviour_logprobs is None:  # the policy that sampled, before any step
                    gap.add(logprobs.detach(), mb.old_logprobs, mask, weight)
                del logits
                actor.backward(pg_loss * pg_scale + loss * scale)
                step_stats = {"policy/loss": pg_loss.detach(), "objective/entropy": entropy.detach(),
                              "policy/clipfrac": pg_stats["clipfrac"], "policy/approxkl": pg_stats["approxkl"],
                              "policy/ratio_mean": pg_stats["ratio_mean"]}
                if "behaviour_weight_mean" in pg_stats:
                    step_stats["policy/behaviour_weight_mean"] = pg_stats["behaviour_weight_mean"]

                # Value loss
                if critic is not None:
                    values = response_values(critic, mb.batch)  # (b, r)
                    vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, cfg.value_clip_eps)
                    critic.backward(cfg.vf_coef * vf_loss * scale)
                    step_stats.update({"val/vf_loss": vf_loss.detach(), "val/clipfrac": vf_stats["vf_clipfrac"]})
                for name, value in step_stats.items():
                    # the policy loss of a sequence aggregation is a mean over sequences: weigh it so
                    units = sequences if per_sequence and name == "policy/loss" else tokens
                    sums[name] = sums.get(name, 0.0) + value * units
            actor.step()
            if critic is not None:
                critic.step()

            for name, value in sums.items():  # token- (or sequence-) weighted means over the global minibatch
                count = len(rows) if per_sequence and name == "policy/loss" else local_tokens
                totals[name] = totals.get(name, 0.0) + reducer.mean(value, count)
            steps += 1
    stats = {name: total / steps for name, total in totals.items()} | gap.stats(reducer)
    if experience.values is not None:
        stats["val/explained_variance"] = explained_variance(experience.values, experience.returns,
                                                             experience.mask).item()
    return stats


class LogprobGap:
    """|learner - sampler| log-prob of the response tokens (`rollout/logprob_diff_mean`, `_max`).

    Measured on the first minibatch of an update, whose forward pass runs before any optimizer step: the
    learner's log-probs of the very policy that sampled. Sampler and learner run different code (a KV-cache
    decode against a full forward, other kernels and dtypes on GPU), and a gap that grows is what makes RL
    runs collapse in the peers; off-policy episodes (overlap) are not measured, their policies differ.
    """

    def __init__(self):
        self.total, self.tokens, self.max = 0.0, 0.0, torch.tensor(0.0)

    def add(self, learner: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, weight: float) -> None:
        if weight:
            diff = (learner - sampler).abs() * mask
            self.total += float(diff.sum())
            self.tokens += float(mask.sum())
            self.max = torch.maximum(self.max, diff.max().cpu())

    def stats(self, reducer: Reducer) -> dict:
        tokens = float(reducer.sum(torch.tensor(self.tokens, dtype=torch.float64)))
        if not tokens:  # every rank skipped (off-policy episodes): the same decision on all of them
            return {}
        return {"rollout/logprob_diff_mean": float(reducer.sum(torch.tensor(self.total, dtype=torch.float64))) / tokens,
                "rollout/logprob_diff_max": float(reducer.max(self.max.double()))}


@torch.no_grad()
def sequence_kl(episodes, reference, temperature: float, pad_id: int, reducer: Reducer = Reducer(),
                max_tokens: int | None = None) -> torch.Tensor:
    """KL(policy || reference) of each episode (B,), nats: the k1 estimate summed over its response tokens,
    from the log-probs its sampler recorded and the reference's. Unbiased for episodes sampled from the policy
    (held-out evaluation); every rank must call it (the reference pass is a collective under ZeRO-3)."""
    batch = pack(episodes, pad_id)
    sampled = torch.zeros_like(batch.response_mask)
    for row, episode in enumerate(episodes):
        sampled[row, : len(episode.behaviour_logprobs)] = torch.tensor(episode.behaviour_logprobs)
    device = _device_of(reference)
    batch, sampled = batch.to(device), sampled.to(device)
    ref_logprobs = torch.zeros_like(sampled)
    groups = micro_batches(np.array([len(e.prompt_ids) for e in episodes]),
                           np.array([len(e.response_ids) for e in episodes]), max_tokens, reducer)
    for index, _ in micro_batch_rows(groups, device):
        micro = batch.select(index)
        ref_logprobs[index, :micro.response_mask.shape[1]] = response_logprobs(reference, micro, temperature)
    return ((sampled - ref_logprobs) * batch.response_mask).sum(-1)
