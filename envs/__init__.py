"""Gymnasium environments for RLHF on language models: one action is one token.

Importing this package registers `rlhf_ray/TextGeneration-v0` (once), so that

    import envs, gymnasium
    env = gymnasium.make("rlhf_ray/TextGeneration-v0")                  # the built-in toy task
    env = gymnasium.make("rlhf_ray/TextGeneration-v0", prompts=[...], reward_fn="pkg.mod:fn")
    env = gymnasium.make("rlhf_ray/Dialogue-v0", task="calculator")   # multi-turn (envs.dialogue)
    vec = gymnasium.make_vec("rlhf_ray/TextGeneration-v0", num_envs=8,
                             vectorization_mode="vector_entry_point")  # TextGenerationVectorEnv

No Ray and no DeepSpeed here (shared/DESIGN.md: `envs` knows nothing of Ray).
"""

from gymnasium.envs.registration import register, registry

from envs.builtin import BUILTIN_PROMPTS, SENTIMENT_REWARD, sentiment_reward
from envs.text_generation import NO_PROMPT, TextGenerationEnv, TextGenerationTask
from envs.vector import TextGenerationVectorEnv

ENV_ID = "rlhf_ray/TextGeneration-v0"
DIALOGUE_ENV_ID = "rlhf_ray/Dialogue-v0"  # multi-turn: envs.dialogue

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="envs.text_generation:TextGenerationEnv",
        vector_entry_point="envs.vector:TextGenerationVectorEnv",
    )
if DIALOGUE_ENV_ID not in registry:
    register(id=DIALOGUE_ENV_ID, entry_point="envs.dialogue:DialogueEnv",
             vector_entry_point="envs.dialogue:DialogueVectorEnv")

__all__ = [
    "BUILTIN_PROMPTS", "DIALOGUE_ENV_ID", "ENV_ID", "NO_PROMPT", "SENTIMENT_REWARD", "TextGenerationEnv", "TextGenerationTask",
    "TextGenerationVectorEnv", "sentiment_reward",
]
