"""One PPO update sharded over two Ray Train workers (ZeRO-2 and ZeRO-3, gloo) equals one process.

The episodes are fixed (sampled once in the test), the two ranks hold different numbers of response
tokens, and the update runs two epochs with a critic: whitening across ranks, the global token
mean of the losses and the engines' gradient averaging all have to be right for the parameters to
match the single-process computation. With a token budget per micro-batch the ranks also split
their minibatches into different numbers of micro-batches, which have to pair up across ranks and
add up to the same gradients.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from envs.builtin import BUILTIN_PROMPTS, sentiment_reward
from rlhf_ray.config import LoraSettings, PPOConfig
from rlhf_ray.learner import EngineConfig, deepspeed_worker_env, make_optimizer
from rlhf_ray.learner.engine import AdaptersDisabled
from rlhf_ray.learner.ppo import (
    LogprobGap, Reducer, TorchEngine, make_experience, micro_batches, ppo_update, sequence_kl, sequence_scores,
)
from rlhf_ray.models import build_tiny_model
from rlhf_ray.models.lora import adapter_payload, add_adapters, base_state_dict, merged_state_dict
from rlhf_ray.models.value import ValueModel
from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed

NUM_WORKERS = 2
TEMPERATURE = 0.9
PPO = PPOConfig(epochs=2, minibatch_size=8, vf_coef=0.5, kl={"coef": 0.1})
ENGINE = dict(lr=3e-3, adam_eps=1e-3, max_grad_norm=1.0, micro_batch_size=8 // NUM_WORKERS,
              stage3_param_persistence_threshold=0)


def fixed_episodes():
    model, tokenizer = build_tiny_model("gpt2", seed=0)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in BUILTIN_PROMPTS[:8]]
    sampler = Sampler(model, tokenizer, sentiment_reward, SamplingParams(max_new_tokens=10, temperature=TEMPERATURE))
    return sampler.generate(prompts, [episode_seed(3, 0, i) for i in range(8)])


def models():
    """Actor, critic (value head on the policy's backbone) and reference, all from seed 0."""
    actor, tokenizer = build_tiny_model("gpt2", seed=0)
    reference, _ = build_tiny_model("gpt2", seed=0)
    critic = ValueModel(build_tiny_model("gpt2", seed=0)[0].transformer)
    return actor, critic, reference, tokenizer


# The critic-free family (no critic): each with a loss aggregation that weighs sequences, not tokens, so that
# the per-sequence weights have to add up over micro-batches and ranks as the token weights do
CRITIC_FREE = {
    "grpo_seq_mean": PPOConfig(advantage_estimator="grpo", group_size=2, epochs=2, minibatch_size=8,
                               kl={"coef": 0.1}, loss_aggregation="seq-mean-token-mean"),
    "dr_grpo_sum_norm": PPOConfig(advantage_estimator="dr_grpo", group_size=2, epochs=2, minibatch_size=8,
                                  kl={"coef": 0.1}, loss_aggregation="seq-mean-token-sum-norm",
                                  whiten_advantages=False, clip_eps_high=0.28),
    "rloo_gspo": PPOConfig(advantage_estimator="rloo", group_size=2, epochs=2, minibatch_size=8, kl={"coef": 0.1},
                           policy_loss="gspo", clip_eps=0.05, clip_eps_high=0.08),
    "reinforce_pp_seq_sum": PPOConfig(epochs=2, minibatch_size=8, kl={"coef": 0.1}, advantage_estimator="reinforce_pp",
                                      loss_aggregation="seq-mean-token-sum"),
}
NORM_LENGTH = 10  # the episodes' max_new_tokens
# LoRA on GPT-2's attention and MLP input (Conv1D layers); the reference is the policy with adapters off
LORA = LoraSettings(r=4, alpha=8.0, target_modules=["c_attn", "c_fc"])


def with_adapters(actor, lora):
    """The actor in LoRA adapters whose B is not zero, so that the reference (adapters off) differs from it."""
    if lora is None:
        return actor
    actor = add_adapters(actor, lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return actor


def plain_weights(state: dict, lora) -> dict:
    """A trained policy's weights under the plain model's names: with LoRA, the adapters merged into the base."""
    if lora is None:
        return state
    return merged_state_dict(build_tiny_model("gpt2", seed=0)[0], base_state_dict(state),
                             adapter_payload(state, lora.alpha / lora.r))


def one_update(actor, critic, reference, episodes, pad_id, reducer, max_tokens=None, ppo=PPO):
    experience, rollout_stats = make_experience(episodes, actor, critic, reference, ppo, ppo.kl.coef,
                                                TEMPERATURE, pad_id, reducer, max_tokens)
    stats = ppo_update(actor, critic, experience, ppo, ppo.kl.coef, TEMPERATURE,
                       torch.Generator().manual_seed(reducer.rank), reducer, max_tokens, NORM_LENGTH)
    return {**rollout_stats, **stats}


def sharded_update(config: dict) -> dict:
    """Ray Train worker: this rank's half of the episodes, one PPO update, gathered weights to files."""
    from rlhf_ray.learner import create_engine, create_reference_engine, gather_full_state_dict
    from rlhf_ray.learner.distributed import DistributedReducer

    reducer = DistributedReducer()
    cfg = EngineConfig(zero_stage=config["zero_stage"], **ENGINE)
    ppo, lora = config.get("ppo", PPO), config.get("lora")
    actor, critic, reference, tokenizer = models()
    actor = create_engine(with_adapters(actor, lora), cfg, train_batch_size=ppo.minibatch_size)
    critic = (create_engine(critic, cfg, train_batch_size=ppo.minibatch_size) if ppo.advantage_estimator == "gae"
              else None)
    reference = AdaptersDisabled(actor) if lora else create_reference_engine(reference, cfg)
    episodes = config["episodes"]
    half = len(episodes) // NUM_WORKERS
    stats = one_update(actor, critic, reference, episodes[reducer.rank * half:(reducer.rank + 1) * half],
                       tokenizer.pad_token_id, reducer, config["max_tokens"][reducer.rank], ppo)
    actor_state = gather_full_state_dict(actor)  # a collective: every rank
    actor_state = plain_weights(actor_state, lora) if reducer.rank == 0 else None
    critic_state = gather_full_state_dict(critic) if critic is not None else {}
    if reducer.rank == 0:
        torch.save({"actor": actor_state, "critic": critic_state, "stats": stats}, config["out"])
    return stats


def single_process_update(episodes, max_tokens=None, reducer=Reducer(), ppo=PPO, lora=None):
    actor, critic, reference, tokenizer = models()
    actor = with_adapters(actor, lora)
    cfg = EngineConfig(**ENGINE)
    actor_engine = TorchEngine(actor, make_optimizer(actor, cfg), cfg.max_grad_norm)
    reference = AdaptersDisabled(actor_engine) if lora else reference
    critic_engine = None
    if ppo.advantage_estimator == "gae":
        critic_engine = TorchEngine(critic, make_optimizer(critic, cfg), cfg.max_grad_norm)
    stats = one_update(actor_engine, critic_engine, reference, episodes, tokenizer.pad_token_id, reducer, max_tokens,
                       ppo)
    return plain_weights(actor.state_dict(), lora), critic.state_dict() if critic_engine else {}, stats


@pytest.fixture(scope="module")
def episodes():
    eps = fixed_episodes()
    lengths = [len(e.response_ids) for e in eps]
    assert sum(lengths[:4]) != sum(lengths[4:]), "the ranks should hold different numbers of tokens"
    return eps


@pytest.fixture(scope="module")
def reference_update(episodes):
    return single_process_update(episodes)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=NUM_WORKERS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class MaxOver(Reducer):
    """A reducer whose other ranks hold `others` (for `max`)."""

    def __init__(self, *others):
        self.others = others

    def max(self, tensor):
        return torch.stack([tensor, *map(torch.as_tensor, self.others)]).max()


def test_sequence_scores_scale_rewards_and_replace_those_cut_without_eos():
    rewards, eos = np.array([0.5, -1.0, 2.0]), np.array([True, False, True])
    # reward_scale 2: 0.5 -> 1.0, -1.0 -> -2.0, 2.0 -> 4.0; no penalty set: the cut response keeps its score
    assert sequence_scores(rewards, eos, PPOConfig(reward_scale=2.0)).tolist() == [1.0, -2.0, 4.0]
    # the penalty replaces the cut response's (scaled) score, and is not scaled itself
    assert sequence_scores(rewards, eos, PPOConfig(reward_scale=2.0, missing_eos_penalty=-3.0)).tolist() == [
        1.0, -3.0, 4.0]
    # DAPO's overlong shaping, budget 8 with a buffer of 4: lengths 4, 6, 8 lose 0, 2/4 and 4/4 of factor 0.5
    shaped = sequence_scores(rewards, eos, PPOConfig(overlong_buffer=4, overlong_penalty_factor=0.5), [4, 6, 8], 8)
    assert shaped.tolist() == [0.5, -1.25, 1.5]
    with pytest.raises(ValueError, match="overlong_buffer needs the response lengths"):
        sequence_scores(rewards, eos, PPOConfig(overlong_buffer=4))


def test_the_logprob_gap_is_the_token_mean_and_max_of_learner_minus_sampler():
    gap = LogprobGap()
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]])
    sampler = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the -9 is padding
    gap.add(learner, sampler, mask, weight=1.0)
    gap.add(learner + 5.0, sampler, mask, weight=0.0)  # a weight-0 micro-batch (a rank's filler) adds nothing
    assert gap.stats(Reducer()) == {"rollout/logprob_diff_mean": pytest.approx(0.75 / 4),
                                    "rollout/logprob_diff_max": 0.5}
    assert LogprobGap().stats(Reducer()) == {}  # nothing measured (off-policy episodes): not logged


def test_with_kl_coef_0_the_reference_is_not_used_and_its_kl_not_logged(episodes):
    """The skipped reference pass changes nothing: any reference (here a different model) gives the same update."""
    ppo = PPOConfig.model_validate({**CRITIC_FREE["grpo_seq_mean"].model_dump(), "kl": {"coef": 0.0}})
    results = []
    for reference in (build_tiny_model("gpt2", seed=5)[0], None):
        actor, _, _, tokenizer = models()
        engine = TorchEngine(actor, make_optimizer(actor, EngineConfig(**ENGINE)), 1.0)
        stats = one_update(engine, None, reference, episodes, tokenizer.pad_token_id, Reducer(), ppo=ppo)
        results.append((actor.state_dict(), stats))
    (first, stats), (second, _) = results
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert "objective/kl" not in stats and stats["objective/kl_coef"] == 0.0
    # the first minibatch's forward pass is the sampling policy's: learner and sampler agree to float error
    assert 0.0 <= stats["rollout/logprob_diff_max"] < 1e-4


def test_held_out_kl_is_zero_against_the_sampling_policy_and_the_k1_sum_against_another(episodes):
    model, tokenizer = build_tiny_model("gpt2", seed=0)  # the policy that sampled `episodes`
    assert sequence_kl(episodes, model, TEMPERATURE, tokenizer.pad_token_id).abs().max() < 1e-4
    other, _ = build_tiny_model("gpt2", seed=5)
    kl = sequence_kl(episodes, other, TEMPERATURE, tokenizer.pad_token_id, max_tokens=40)
    for row, episode in enumerate(episodes):
        from rlhf_ray.models.forward import pack_episodes, response_logprobs

        batch = pack_episodes([episode.prompt_ids], [episode.response_ids], tokenizer.pad_token_id)
        ref = response_logprobs(other, batch, TEMPERATURE)[0, :len(episode.response_ids)]
        assert kl[row].item() == pytest.approx(float(episode.behaviour_logprobs.sum() - ref.sum()), abs=1e-4)


def test_micro_batches_take_rows_longest_first_within_the_token_budget():
    prompts, responses = [3, 2, 4, 1, 2], [5, 1, 4, 0, 6]  # totals 8, 3, 8, 1, 8
    # longest first (ties in order): rows 0, 2, 4, 1, 3. Row 0 costs 1 x (3 + 5) = 8; adding row 2 would cost
    # 2 x (4 + 5) = 18 > 16, so it starts a new micro-batch; rows 2 + 4: 2 x (4 + 6) = 20 > 16; rows 4 + 1:
    # 2 x (2 + 6) = 16, fits; + row 3: 3 x 8 = 24, does not
    groups = micro_batches(np.array(prompts), np.array(responses), max_tokens=16)
    assert [g.tolist() for g in groups] == [[0], [2], [4, 1], [3]]
    # another rank needs 6: the largest group is split, then empty groups (run with weight 0) make up the rest
    groups = micro_batches(np.array(prompts), np.array(responses), max_tokens=16, reducer=MaxOver(6))
    assert [g.tolist() for g in groups] == [[0], [2], [4], [1], [3], []]
    assert [g.tolist() for g in micro_batches(np.array(prompts), np.array(responses), None)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("others", [(), (10,)])  # (10,): another rank needs 10 passes, 2 of them empty here
def test_micro_batched_update_equals_the_one_pass_update(episodes, reference_update, others):
    actor_state, critic_state, stats = reference_update
    micro_actor, micro_critic, micro_stats = single_process_update(episodes, max_tokens=24, reducer=MaxOver(*others))
    for name, expected in actor_state.items():
        torch.testing.assert_close(micro_actor[name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name, expected in critic_state.items():
        torch.testing.assert_close(micro_critic[name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name in ("policy/loss", "val/vf_loss", "objective/kl", "policy/approxkl", "objective/entropy"):
        assert micro_stats[name] == pytest.approx(stats[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("name", sorted(CRITIC_FREE))
def test_critic_free_micro_batched_update_equals_the_one_pass_update(episodes, name):
    """Sequence-weighted losses over token-budget micro-batches (and empty passes another rank needs) add up to
    the one-pass update."""
    ppo = CRITIC_FREE[name]
    actor_state, _, stats = single_process_update(episodes, ppo=ppo)
    micro_actor, _, micro_stats = single_process_update(episodes, max_tokens=24, reducer=MaxOver(10), ppo=ppo)
    initial, _ = build_tiny_model("gpt2", seed=0)
    assert max((actor_state[k] - v).abs().max().item() for k, v in initial.state_dict().items()) > 1e-4
    for key, expected in actor_state.items():
        torch.testing.assert_close(micro_actor[key], expected, atol=2e-5, rtol=1e-4, msg=key)
    for key in ("policy/loss", "objective/kl", "policy/approxkl"):
        assert micro_stats[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key


# (None, None): each minibatch in one pass; (100, 13): rank 0 needs one pass per minibatch, rank 1 four, so
# rank 0 splits its minibatch to pair up with rank 1
# "grpo_seq_mean+lora": a critic-free update whose policy loss is a mean over sequences, over ranks that hold
# different numbers of tokens and split their minibatches differently, training LoRA adapters under ZeRO-3
@pytest.mark.parametrize("zero_stage,max_tokens,ppo_name", [(2, (None, None), None), (3, (None, None), None),
                                                            (2, (100, 13), None), (3, (100, 13), None),
                                                            (3, (100, 13), "grpo_seq_mean+lora")])
def test_sharded_ppo_update_equals_the_single_process_update(local_ray, episodes, reference_update,
                                                             zero_stage, max_tokens, ppo_name, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "update.pt"
    lora = LORA if ppo_name and ppo_name.endswith("+lora") else None  # ZeRO-3 with frozen base weights
    TorchTrainer(
        sharded_update,
        train_loop_config={"zero_stage": zero_stage, "episodes": episodes, "out": str(out), "max_tokens": max_tokens,
                           "ppo": CRITIC_FREE[ppo_name.removesuffix("+lora")] if ppo_name else PPO, "lora": lora},
        scaling_config=ScalingConfig(num_workers=NUM_WORKERS, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ppo", storage_path=str(tmp_path / "ray_results"),
                             worker_runtime_env={"env_vars": deepspeed_worker_env(use_gpu=False)}),
    ).fit()
    sharded = torch.load(out)
    if ppo_name is None:
        actor_state, critic_state, stats = reference_update
    else:
        actor_state, critic_state, stats = single_process_update(
            episodes, ppo=CRITIC_FREE[ppo_name.removesuffix("+lora")], lora=lora)

    initial = plain_weights(with_adapters(build_tiny_model("gpt2", seed=0)[0], lora).state_dict(), lora)
    moved = max((actor_state[k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "the update should move the policy"
    for name, expected in actor_state.items():
        torch.testing.assert_close(sharded["actor"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name, expected in critic_state.items():
        torch.testing.assert_close(sharded["critic"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name in ("policy/loss", "val/vf_loss", "objective/kl", "rollout/reward_mean", "policy/approxkl"):
        if name in stats or name in sharded["stats"]:
            assert sharded["stats"][name] == pytest.approx(stats[name], rel=1e-4, abs=1e-6), name
