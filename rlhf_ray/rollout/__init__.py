"""Rollouts: the batched KV-cache sampler that drives the environment, rollout actors and their pool.

`rlhf_ray.rollout.sampler` has no Ray in it; the actor and pool modules import Ray.
"""
