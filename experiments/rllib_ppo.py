"""RLlib's PPO (new API stack) on the text-generation env, with the small token-level `TokenGRUModule`.

    python experiments/rllib_ppo.py --iterations 20

One action is one token, the reward is the built-in sentiment score of the finished response
(`envs.builtin`), and the policy is `rlhf_ray.rllib_module.TokenGRUModule` (token embedding + GRU,
policy and value heads). Each iteration prints the mean episode return; at the end, the greedy
responses to a few prompts. This is RLlib's own PPO on the env, to check that the env fits RLlib; the
project's LM-scale PPO is `rlhf-ray train`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
import torch
from ray import tune
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, LEARNER_RESULTS

from envs import ENV_ID, TextGenerationEnv
from rlhf_ray.rllib_module import TokenGRUModule, make_text_generation_env


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20, help="PPO iterations (algo.train() calls)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="response token budget of an episode")
    parser.add_argument("--num-env-runners", type=int, default=1)
    parser.add_argument("--envs-per-runner", type=int, default=8,
                        help="episodes each env runner steps together in one TextGenerationVectorEnv")
    parser.add_argument("--train-batch-size", type=int, default=1024, help="env steps (tokens) per iteration")
    parser.add_argument("--minibatch-size", type=int, default=256)
    parser.add_argument("--num-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="for ray.init; default: all")
    return parser.parse_args()


def build_config(args: argparse.Namespace) -> PPOConfig:
    return (
        PPOConfig()
        .environment(ENV_ID, env_config={"max_new_tokens": args.max_new_tokens})
        .env_runners(
            num_env_runners=args.num_env_runners,
            num_envs_per_env_runner=args.envs_per_runner,
            # RLlib calls the creator with num_envs: one array-based TextGenerationVectorEnv per runner
            # instead of a SyncVectorEnv of single envs
            gym_env_vectorize_mode="vector_entry_point",
            rollout_fragment_length="auto",
        )
        .training(
            train_batch_size_per_learner=args.train_batch_size,
            minibatch_size=args.minibatch_size,
            num_epochs=args.num_epochs,
            lr=args.lr,
            # the reward comes once, at the last token: no discount over a response, as in Ziegler et al. 2019
            gamma=1.0,
            lambda_=0.95,
            use_kl_loss=False,  # RLlib's KL term is to the previous policy, not to a reference model
        )
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=TokenGRUModule,
            model_config={"embedding_dim": args.embedding_dim, "hidden_dim": args.hidden_dim},
        ))
        .debugging(seed=args.seed)
    )


@torch.no_grad()
def greedy_responses(module: TokenGRUModule, env: TextGenerationEnv, num_prompts: int = 4) -> list[str]:
    """'prompt | response' of the module's most likely tokens for the env's first prompts."""
    lines = []
    for index in range(min(num_prompts, len(env.prompts))):
        observation, _ = env.reset(options={"prompt_index": index})
        done, info = False, {}
        while not done:
            batch = {Columns.OBS: {key: torch.as_tensor(np.asarray(value))[None] for key, value in observation.items()}}
            logits = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]  # (1, V)
            observation, _, terminated, truncated, info = env.step(int(logits.argmax(-1)))
            done = terminated or truncated
        lines.append(f"{info['prompt']} | {info['response']}")
    return lines


def main() -> None:
    args = parse_args()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    tune.register_env(ENV_ID, make_text_generation_env)
    algo = build_config(args).build_algo()
    try:
        for iteration in range(1, args.iterations + 1):
            start = time.perf_counter()
            result = algo.train()
            learner = result[LEARNER_RESULTS][DEFAULT_MODULE_ID]
            # no episode finished in the iteration (a tiny batch): no mean to report
            episode_return_mean = result[ENV_RUNNER_RESULTS].get(EPISODE_RETURN_MEAN, float("nan"))
            print(f"iteration {iteration:3d}  episode_return_mean {episode_return_mean:+.3f}"
                  f"  policy_loss {learner['policy_loss']:+.4f}  vf_loss {learner['vf_loss']:.4f}"
                  f"  entropy {learner['entropy']:.3f}  ({time.perf_counter() - start:.1f}s)", flush=True)
        env = make_text_generation_env({"max_new_tokens": args.max_new_tokens})
        print("\n".join(greedy_responses(algo.get_module(), env)))
    finally:
        algo.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
