"""rlhf_ray: reinforcement learning from human feedback for language models, on Ray.

Importing the package is cheap and imports neither Ray nor DeepSpeed; the parts that use them
(`rlhf_ray.rollout`, `rlhf_ray.learner`, `rlhf_ray.serve`, `rlhf_ray.jobs`) import them on use.
"""

__version__ = "0.1.0"
