"""What the server calls the policy it serves: a model id for clients and a version for the feedback.

The version ties every stored completion to the weights that wrote it, so feedback can be filtered or
weighted by policy when it trains the next reward model. It is `v<N>-<digest>`: N the PPO policy version
when the folder sits in a run (a checkpoint's run_state.json, or the run's last metrics line), and the
digest the first 12 hex digits of the SHA-256 of the weight files, which changes whenever the weights do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rlhf_ray.models.loading import BUILTIN_MODELS, resolve_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def model_name(policy: str) -> str:
    """`runs/<name>/policy` -> `<name>`; a checkpoint's policy -> `<name>@iter_N`; any other folder -> its
    name; a model name (built-in, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct) as is."""
    path = Path(policy).expanduser()
    if policy in BUILTIN_MODELS or not path.exists():
        return policy
    path = path.resolve()
    if path.name == "policy" and path.parent.name.startswith("iter_") and path.parent.parent.name == "checkpoints":
        return f"{path.parents[2].name}@{path.parent.name}"
    if path.name == "policy":
        return path.parent.name
    return path.name


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def ppo_policy_version(folder: Path) -> int | None:
    """The PPO policy version of a policy folder inside a run folder, if it can be told."""
    run_state = folder.parent / "run_state.json"
    try:
        if run_state.is_file():
            return int(json.loads(run_state.read_text())["policy_version"])
        metrics = folder.parent / "metrics.jsonl"
        if folder.name == "policy" and metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines:
                return int(json.loads(lines[-1])["policy_version"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return None


def policy_version(policy: str) -> str:
    folder = resolve_model_path(policy)
    version = ppo_policy_version(folder)
    digest = weights_digest(folder)
    return f"v{version}-{digest}" if version is not None else digest
