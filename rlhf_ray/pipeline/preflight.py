"""Preflight: everything the user supplies, checked on the driver before Ray starts, in seconds.

`rlhf-ray train`, `pipeline`, `submit` (locally, before the upload), `label` and `eval` call it first:

- every dataset the run will read, every line (honouring its `on_error`);
- every model path (local folder, built-in name, or a hub id that resolves offline);
- every reward function or reward model: imported or loaded, then called once on real prompts of the
  run and a few responses sampled from the policy (short fixed texts where the policy is too large to
  sample here), through the same `RewardFunction` checks the rollout workers apply (one finite score
  per pair, within `reward.timeout_s`).

A failure is a `PreflightError`: one line that names the config key, `file:line` or `module:function`,
and what was expected. Nothing is written to the run folder before it passes. Outputs of a pipeline
stage that has not run yet (`{run}/sft`, `{run}/reward_model`) are checked when that stage has run
(`rlhf-ray train`, which PPO is, runs its own preflight). With `on_cluster=True` (`rlhf-ray submit`),
absolute paths that do not exist here are left to the job's own preflight on the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.config import RunConfig
from rlhf_ray.errors import TaskError, UserError, one_line

SAMPLE_PROMPTS = 4  # prompts of the run the reward is called on
SAMPLE_TOKENS = 8  # new tokens per sampled response
MAX_SAMPLED_POLICY_BYTES = 2 << 30  # larger policies are not loaded on the driver: fixed responses instead
FIXED_RESPONSES = ("Thank you for asking.", "I am not sure.", "Yes", "")


class PreflightError(UserError):
    """Something the user supplied cannot work; the message names the key, file:line or function."""


@dataclass
class PreflightReport:
    checked: list[str] = field(default_factory=list)  # what was checked, in order
    skipped: list[str] = field(default_factory=list)  # what is left to a later stage or to the cluster
    seconds: float = 0.0

    def line(self) -> str:
        left = f"; left for later: {', '.join(self.skipped)}" if self.skipped else ""
        return f"preflight passed in {self.seconds:.1f} s: {', '.join(self.checked)}{left}"


def _made_by(key: str, path: str) -> str:
    """The preflight line of a key whose model an earlier stage of this invocation makes."""
    return f"{key} (made by the {path.rstrip('/').rsplit('/', 1)[-1]} stage)"


def _stage_output(path: str | None, made: set[str]) -> bool:
    """`path` is `{run}/<stage>` of a stage this invocation will make (it cannot exist yet)."""
    return path is not None and path.rstrip("/") in made


def _missing_on_this_machine(path: str, on_cluster: bool) -> bool:
    """An absolute path absent here that a cluster may have (`rlhf-ray submit`): its job checks it there."""
    return on_cluster and Path(path).is_absolute() and not Path(path).exists()


def check_model(key: str, name: str, report: PreflightReport, on_cluster: bool = False) -> Path | None:
    """The folder of model `name` (config key `key`), or None when it is left to the cluster."""
    from rlhf_ray.models import resolve_model_path

    if _missing_on_this_machine(name, on_cluster):
        report.skipped.append(f"{key} ({name}, on the cluster)")
        return None
    try:
        path = resolve_model_path(name)
    except (OSError, ValueError) as err:
        raise PreflightError(f"{key}: {one_line(err)}") from err
    report.checked.append(key)
    return path


def check_dataset(key: str, dataset, report: PreflightReport, kind: str, on_cluster: bool = False) -> list:
    """Every record of a `DatasetConfig` (`kind`: prompts, sft, preferences or ratings), raw (no chat template)."""
    from rlhf_ray.data import DataError

    if _missing_on_this_machine(dataset.path, on_cluster):
        report.skipped.append(f"{key} ({dataset.path}, on the cluster)")
        return []
    load = {"prompts": dataset.load_prompts, "sft": dataset.load_sft, "preferences": dataset.load_preferences,
            "ratings": dataset.load_ratings}[kind]
    try:
        records = load()
    except DataError as err:
        raise PreflightError(f"{key}: {one_line(err)}") from err
    report.checked.append(f"{key} ({len(records)} records)")
    return records


def check_one_batch(stage: str, section, records: int) -> None:
    """A stage whose training split holds fewer records than one batch would run no optimizer step."""
    from rlhf_ray.stages.common import held_out_count

    held = held_out_count(records, section.eval_fraction)
    if records - held < section.batch_size:
        raise PreflightError(f"{stage}.batch_size: {section.batch_size} is more than the {records - held} training "
                             f"records of {stage}.data ({records} read, {held} held out by {stage}.eval_fraction): "
                             "no optimizer step would run")


def check_reward_call(key: str, reward_fn, prompts: Sequence[str], responses: Sequence[str],
                      report: PreflightReport) -> None:
    """Call the reward once on (prompt, response) pairs, with the checks of the rollout workers."""
    try:
        reward_fn(list(prompts), list(responses))
    except UserError as err:
        raise PreflightError(f"{key}: {one_line(err)}") from err
    report.checked.append(f"{key} (called on {len(prompts)} pairs)")


def fixed_responses(n: int) -> list[str]:
    """`n` short responses for a reward call when none can be sampled (an empty one among them)."""
    return [FIXED_RESPONSES[i % len(FIXED_RESPONSES)] for i in range(n)]


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def sample_responses(config: RunConfig, policy_path: Path | None, prompts: list[str],
                     report: PreflightReport) -> list[str]:
    """A few short responses of the policy to `prompts` (the workers' sampler and sampling settings), or
    fixed texts when the policy is too large to load here or not made yet."""
    if policy_path is None or _weights_bytes(policy_path) > MAX_SAMPLED_POLICY_BYTES:
        return fixed_responses(len(prompts))
    import dataclasses

    from rlhf_ray.models import load_policy
    from rlhf_ray.rollout.run_sampler import sampling_params
    from rlhf_ray.rollout.sampler import Sampler, episode_seed

    model, tokenizer = load_policy(policy_path)
    params = dataclasses.replace(sampling_params(config),
                                 max_new_tokens=min(SAMPLE_TOKENS, config.rollout.max_new_tokens))
    sampler = Sampler(model, tokenizer, lambda p, r: [0.0] * len(r), params, max_length=config.rollout.max_length)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    try:
        episodes = sampler.generate(ids, [episode_seed(config.seed, 0, i) for i in range(len(ids))])
    except TaskError as err:  # the task's user or tool raised or answered wrongly
        raise PreflightError(f"rollout.dialogue.task: {one_line(err)}") from err
    except UserError as err:  # a prompt that does not fit rollout.max_length
        raise PreflightError(f"data: {one_line(err)}") from err
    report.checked.append(f"{len(episodes)} responses sampled from model.policy")
    return [e.response for e in episodes]


def check_dialogue(config: RunConfig, policy_path: Path | None, report: PreflightReport) -> None:
    """`rollout.dialogue.task` loads, and the policy's tokenizer has a chat template to write its messages in."""
    from envs.dialogue import ChatFormat, load_task

    try:
        load_task(config.rollout.dialogue.task)
    except TaskError as err:
        raise PreflightError(f"rollout.dialogue.task: {one_line(err)}") from err
    if policy_path is not None:
        from rlhf_ray.models import load_tokenizer

        try:
            ChatFormat.of(load_tokenizer(policy_path))
        except ValueError as err:
            raise PreflightError(f"rollout.dialogue: model.policy: {one_line(err)}") from err
    report.checked.append(f"rollout.dialogue.task {config.rollout.dialogue.task}")


def check_lora(config: RunConfig, policy_path: Path, report: PreflightReport) -> None:
    """`model.lora.target_modules` exist in the policy: adapters put on its architecture, without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_ray.models.lora import add_adapters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_path))
    try:
        adapted = add_adapters(model, config.model.lora)
    except ValueError as err:
        raise PreflightError(one_line(err)) from err
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    report.checked.append(f"model.lora ({trainable:,} adapter parameters)")


def _reward_keys(config: RunConfig) -> list[tuple[str, str]]:
    """(config key, model folder) of every reward model the reward reads."""
    keys = [(f"reward.components.{name}.model", c.model) for name, c in (config.reward.components or {}).items()
            if c.model is not None]
    if config.reward.function and ":" not in config.reward.function:
        keys.append(("reward.function", config.reward.function))
    return keys


def preflight(config: RunConfig, stages: Sequence[str] = ("ppo",), on_cluster: bool = False,
              log: Callable[[str], None] | None = print) -> PreflightReport:
    """Check what the `stages` of a run (of `sft`, `reward_model`, `satisfaction_model`, `dpo`, `ppo`) will read;
    raise PreflightError.

    `config` has absolute paths (`RunConfig.with_absolute_paths`).
    """
    started = time.perf_counter()
    report = PreflightReport()
    kinds = {"sft": "sft", "reward_model": "preferences", "satisfaction_model": "ratings", "dpo": "preferences"}
    made = {f"{{run}}/{stage}" for stage in kinds if stage in stages and getattr(config, stage) is not None}
    for stage, kind in kinds.items():
        section = getattr(config, stage)
        if stage in stages and section is not None:
            if _stage_output(section.base, made):  # e.g. DPO from "{run}/sft", made by this pipeline first
                report.skipped.append(_made_by(f"{stage}.base", section.base))
            else:
                check_model(f"{stage}.base", config.expand(section.base), report, on_cluster)
            if section.data is None:  # <stage>.feedback_db: exported when the stage is to run
                report.skipped.append(f"{stage}.data (exported from {stage}.feedback_db)")
            else:
                records = check_dataset(f"{stage}.data", section.data, report, kind, on_cluster)
                if records:  # none when the file is on the cluster only
                    check_one_batch(stage, section, len(records))
    if "ppo" in stages:
        _preflight_ppo(config, made, report, on_cluster)
    report.seconds = time.perf_counter() - started
    if log is not None:
        log(report.line())
    return report


def _preflight_ppo(config: RunConfig, made: set[str], report: PreflightReport, on_cluster: bool) -> None:
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.rewards.composite import build_reward
    from rlhf_ray.rollout.run_sampler import prompt_texts, reward_spec

    policy_path = None
    for key, name in (("model.policy", config.model.policy), ("model.reference", config.model.reference)):
        if name is None:
            continue
        if _stage_output(name, made):
            report.skipped.append(_made_by(key, name))
            continue
        path = check_model(key, config.expand(name), report, on_cluster)
        if key == "model.policy":
            policy_path = path
    if config.model.lora is not None and policy_path is not None:
        check_lora(config, policy_path, report)
    if config.rollout.dialogue is not None:
        check_dialogue(config, policy_path, report)
    if config.data.prompt_dataset is not None:
        check_dataset("data.prompt_dataset", config.data.prompt_dataset, report, "prompts", on_cluster)
    if config.train.eval_every and config.data.eval_dataset is not None:
        check_dataset("data.eval_dataset", config.data.eval_dataset, report, "prompts", on_cluster)
    pending = [(key, path) for key, path in _reward_keys(config) if _stage_output(path, made)]
    if pending:  # the reward reads a model that an earlier stage makes: PPO's own preflight calls it
        report.skipped.extend(_made_by(key, path) for key, path in pending)
        return
    for key, path in _reward_keys(config):
        if _missing_on_this_machine(config.expand(path), on_cluster):
            report.skipped.append(f"{key} ({path}, on the cluster)")
            return
    reward_key = "reward.components" if config.reward.components else "reward.function"
    try:
        reward_fn = build_reward(reward_spec(config), device="cpu")
    except UserError as err:
        raise PreflightError(f"{reward_key}: {one_line(err)}") from err
    tokenizer = load_tokenizer(policy_path) if policy_path is not None else None
    try:
        prompts = prompt_texts(config, tokenizer)[:SAMPLE_PROMPTS]
    except UserError as err:  # a chat template the tokenizer does not have
        raise PreflightError(f"data.prompt_dataset: {one_line(err)}") from err
    responses = sample_responses(config, policy_path, prompts, report)
    check_reward_call(reward_key, reward_fn, prompts, responses, report)
