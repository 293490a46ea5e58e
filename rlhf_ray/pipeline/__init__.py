"""Orchestration of a run: start or join Ray, the rollout pool, the Ray Train learner, outputs."""
