"""One PPO update sharded over two Ray Train workers (ZeRO-2 and ZeRO-3, gloo) equals one process.

The episodes are fixed (sampled once in the test), the two ranks hold different numbers of response
tokens, and the update runs two epochs with a critic: whitening across ranks, the global token
mean of the losses and the engines' gradient averaging all have to be right for the parameters to
match the single-process computation.
"""

from __future__ import annotations

import sys

import pytest
import torch

from envs.builtin import BUILTIN_PROMPTS, sentiment_reward
from rlhf_ray.config import PPOConfig
from rlhf_ray.learner import EngineConfig, deepspeed_worker_env, make_optimizer
from rlhf_ray.learner.ppo import Reducer, TorchEngine, make_experience, ppo_update
from rlhf_ray.models import build_tiny_model
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


def one_update(actor, critic, reference, episodes, pad_id, reducer):
    experience, rollout_stats = make_experience(episodes, actor, critic, reference, PPO, PPO.kl.coef,
                                                TEMPERATURE, pad_id, reducer)
    stats = ppo_update(actor, critic, experience, PPO, PPO.kl.coef, TEMPERATURE,
                       torch.Generator().manual_seed(reducer.rank), reducer)
    return {**rollout_stats, **stats}


def sharded_update(config: dict) -> dict:
    """Ray Train worker: this rank's half of the episodes, one PPO update, gathered weights to files."""
    from rlhf_ray.learner import create_engine, create_reference_engine, gather_full_state_dict
    from rlhf_ray.learner.train_loop import DistributedReducer

    reducer = DistributedReducer()
    cfg = EngineConfig(zero_stage=config["zero_stage"], **ENGINE)
    actor, critic, reference, tokenizer = models()
    actor = create_engine(actor, cfg, train_batch_size=PPO.minibatch_size)
    critic = create_engine(critic, cfg, train_batch_size=PPO.minibatch_size)
    reference = create_reference_engine(reference, cfg)
    episodes = config["episodes"]
    half = len(episodes) // NUM_WORKERS
    stats = one_update(actor, critic, reference, episodes[reducer.rank * half:(reducer.rank + 1) * half],
                       tokenizer.pad_token_id, reducer)
    actor_state, critic_state = gather_full_state_dict(actor), gather_full_state_dict(critic)
    if reducer.rank == 0:
        torch.save({"actor": actor_state, "critic": critic_state, "stats": stats}, config["out"])
    return stats


def single_process_update(episodes):
    actor, critic, reference, tokenizer = models()
    cfg = EngineConfig(**ENGINE)
    actor_engine = TorchEngine(actor, make_optimizer(actor, cfg), cfg.max_grad_norm)
    critic_engine = TorchEngine(critic, make_optimizer(critic, cfg), cfg.max_grad_norm)
    stats = one_update(actor_engine, critic_engine, reference, episodes, tokenizer.pad_token_id, Reducer())
    return actor.state_dict(), critic.state_dict(), stats


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

    ray.init(num_cpus=NUM_WORKERS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sharded_ppo_update_equals_the_single_process_update(local_ray, episodes, reference_update,
                                                             zero_stage, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "update.pt"
    TorchTrainer(
        sharded_update,
        train_loop_config={"zero_stage": zero_stage, "episodes": episodes, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=NUM_WORKERS, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ppo", storage_path=str(tmp_path / "ray_results"),
                             worker_runtime_env={"env_vars": deepspeed_worker_env(use_gpu=False)}),
    ).fit()
    sharded = torch.load(out)
    actor_state, critic_state, stats = reference_update

    initial, _ = build_tiny_model("gpt2", seed=0)
    moved = max((actor_state[k] - v).abs().max().item() for k, v in initial.state_dict().items())
    assert moved > 1e-3, "the update should move the policy"
    for name, expected in actor_state.items():
        torch.testing.assert_close(sharded["actor"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name, expected in critic_state.items():
        torch.testing.assert_close(sharded["critic"][name], expected, atol=2e-5, rtol=1e-4, msg=name)
    for name in ("policy/loss", "val/vf_loss", "objective/kl", "rollout/reward_mean", "policy/approxkl"):
        assert sharded["stats"][name] == pytest.approx(stats[name], rel=1e-4, abs=1e-6), name
