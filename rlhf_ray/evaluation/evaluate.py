"""Evaluate a policy against its reference on held-out prompts: reward, KL, win rate, length, BLEU/ROUGE.

    result = evaluate(policy, reference, tokenizer, prompts, reward_fn, params=SamplingParams(max_new_tokens=16))
    result.policy["reward"], result.kl, result.win_rate

What is measured, and how (no Ray: models, a tokenizer and reward functions in, numbers out):
- one response per prompt from the policy and one from the reference, sampled with the same per-prompt
  seeds (`episode_seed(seed, 0, i)`), so a difference between them comes from the models, not the draw;
- the reward of each response (the total, and each component of a composite reward, unweighted, as
  training logs `reward/<name>`), as the sampler scores finished episodes;
- KL(policy || reference) per sequence on the policy's responses: the k1 estimator
  sum_t (log pi - log pi_ref) over response tokens, with log-probabilities of a fresh forward pass at
  the sampling temperature, as the learner's `objective/kl` (Schulman, http://joschu.net/blog/kl-approx.html);
- the win rate of the policy over the reference, as a judge (a reward model) scores the two responses
  to each prompt; a tie counts one half;
- response length in tokens, EOS included (training's `rollout/response_len`);
- BLEU (sacrebleu, corpus level) and ROUGE-1/2/L F-measure (rouge_score, mean over prompts) against
  the dataset's reference responses, when it has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.models.forward import pack, response_logprobs
from rlhf_ray.rewards import RewardFunction, as_reward_function
from rlhf_ray.rollout.sampler import Episode, Sampler, SamplingParams, episode_seed

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class Sample:
    """One held-out prompt with the policy's and the reference's response and their scores."""

    prompt: str  # as the models and the reward saw it (in the chat template, if any)
    prompt_text: str  # as the dataset has it
    target: str | None  # the dataset's reference response, when it has one
    policy_response: str
    reference_response: str
    policy_reward: float
    reference_reward: float
    policy_judge: float  # the judge's score, which decides the win
    reference_judge: float
    kl: float  # sum over the policy's response tokens of log pi - log pi_ref, nats
    policy_length: int  # response tokens, EOS included
    reference_length: int
    policy_components: dict[str, float] = field(default_factory=dict)  # unweighted components of a composite
    reference_components: dict[str, float] = field(default_factory=dict)

    @property
    def win(self) -> float:
        """1 when the judge prefers the policy's response, 0.5 on a tie, 0 when it prefers the reference's."""
        return float(np.sign(self.policy_judge - self.reference_judge) + 1.0) / 2.0


@dataclass
class EvalResult:
    """Summary numbers of each model (`policy`, `reference`: name -> value), the KL, win rate and the samples."""

    policy: dict[str, float]  # reward, reward/<component>, length, eos_frac[, bleu, rouge1, rouge2, rougeL]
    reference: dict[str, float]
    kl: float  # mean over prompts of the per-sequence KL(policy || reference), nats
    win_rate: float  # share of prompts where the judge prefers the policy's response (ties: 1/2)
    judge: str  # the judge's name
    samples: list[Sample]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "reference": self.reference, "kl": self.kl, "win_rate": self.win_rate,
                "judge": self.judge, "num_prompts": len(self.samples),
                "samples": [asdict(sample) for sample in self.samples]}


def sample_episodes(model, tokenizer, reward_fn: RewardFunction, prompt_ids: list[list[int]], seeds: list[int],
                    params: SamplingParams, max_length: int | None, batch_size: int) -> list[Episode]:
    """One scored episode per prompt, at most `batch_size` decoded at once (continuous batching; the seeds
    alone decide the draw)."""
    sampler = Sampler(model, tokenizer, reward_fn, params, max_length=max_length, max_batch=batch_size)
    return sampler.generate(prompt_ids, seeds)


@torch.inference_mode()
def sequence_kl(policy, reference, episodes: Sequence[Episode], pad_id: int, temperature: float,
                batch_size: int) -> np.ndarray:
    """(N,) k1 estimate of KL(policy || reference) of each episode: sum_t log pi - log pi_ref, in nats."""
    device = next(policy.parameters()).device
    kls = []
    for start in range(0, len(episodes), batch_size):
        chunk = episodes[start:start + batch_size]
        batch = pack(chunk, pad_id).to(device)
        logprobs = response_logprobs(policy, batch, temperature)  # (B, R)
        ref_logprobs = response_logprobs(reference, batch.to(next(reference.parameters()).device), temperature)
        kl = kl_estimate(logprobs, ref_logprobs.to(device), "k1") * batch.response_mask  # (B, R)
        kls.append(kl.sum(-1).double().cpu().numpy())
    return np.concatenate(kls) if kls else np.zeros(0)


def text_overlap(responses: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """BLEU (sacrebleu's corpus BLEU, 0..100) and mean ROUGE-1/2/L F-measure (0..1) of responses vs targets."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    rouge = [scorer.score(target, response) for response, target in zip(responses, targets, strict=True)]
    overlap = {"bleu": float(sacrebleu.corpus_bleu(list(responses), [list(targets)]).score)}
    for kind in ROUGE_TYPES:
        overlap[kind] = float(np.mean([scores[kind].fmeasure for scores in rouge]))
    return overlap


def judge_scores(episodes: Sequence[Episode], judge: RewardFunction | None) -> np.ndarray:
    """(N,) the judge's score of each episode; with no judge, the reward the sampler gave it."""
    if judge is None:
        return np.array([e.reward for e in episodes])
    return judge([e.prompt for e in episodes], [e.response for e in episodes])


def summarize(episodes: Sequence[Episode], targets: Sequence[str] | None) -> dict[str, float]:
    """The mean reward (and of each component), length and EOS share of one model's episodes [+ BLEU/ROUGE]."""
    summary = {"reward": float(np.mean([e.reward for e in episodes]))}
    components = [e.reward_components for e in episodes if e.reward_components is not None]
    for name in (components[0] if components else {}):
        summary[f"reward/{name}"] = float(np.mean([parts[name] for parts in components]))
    summary["length"] = float(np.mean([len(e.response_ids) for e in episodes]))
    summary["eos_frac"] = float(np.mean([e.eos for e in episodes]))
    if targets is not None:
        summary.update(text_overlap([e.response for e in episodes], targets))
    return summary


def evaluate(policy, reference, tokenizer, prompts: Sequence[str], reward_fn, judge=None,
             params: SamplingParams = SamplingParams(), seed: int = 0, targets: Sequence[str] | None = None,
             max_length: int | None = None, batch_size: int = 16,
             prompt_texts: Sequence[str] | None = None) -> EvalResult:
    """Sample the policy and the reference on `prompts` with the same seeds and compare them.

    `policy`, `reference`: causal LMs sharing `tokenizer`; `reward_fn`: what `as_reward_function` takes
    (a composite's components are reported too); `judge`: the reward function that decides the win
    rate, None for `reward_fn`'s total; `targets`: one reference response per prompt for BLEU/ROUGE;
    `prompt_texts`: the prompts before a chat template was applied, for the report (default `prompts`).
    """
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    for name, texts in (("target responses", targets), ("prompt texts", prompt_texts)):
        if texts is not None and len(texts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(texts)} {name}; expected one per prompt")
    prompt_texts = list(prompts) if prompt_texts is None else prompt_texts
    reward_fn = as_reward_function(reward_fn)
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    seeds = [episode_seed(seed, 0, index) for index in range(len(prompts))]
    runs = {name: sample_episodes(model, tokenizer, reward_fn, prompt_ids, seeds, params, max_length, batch_size)
            for name, model in (("policy", policy), ("reference", reference))}
    kls = sequence_kl(policy, reference, runs["policy"], tokenizer.pad_token_id, params.temperature, batch_size)
    judge = None if judge is None else as_reward_function(judge)
    judged = {name: judge_scores(episodes, judge) for name, episodes in runs.items()}
    samples = [
        Sample(prompt=mine.prompt, prompt_text=prompt_texts[i], target=None if targets is None else targets[i],
               policy_response=mine.response, reference_response=theirs.response,
               policy_reward=mine.reward, reference_reward=theirs.reward,
               policy_judge=float(judged["policy"][i]), reference_judge=float(judged["reference"][i]),
               kl=float(kls[i]), policy_length=len(mine.response_ids), reference_length=len(theirs.response_ids),
               policy_components=dict(mine.reward_components or {}),
               reference_components=dict(theirs.reward_components or {}))
        for i, (mine, theirs) in enumerate(zip(runs["policy"], runs["reference"]))
    ]
    return EvalResult(policy=summarize(runs["policy"], targets), reference=summarize(runs["reference"], targets),
                      kl=float(np.mean(kls)), win_rate=float(np.mean([s.win for s in samples])),
                      judge=f"reward ({reward_fn.name})" if judge is None else judge.name, samples=samples)
