"""The `eval` command of `rlhf-ray`: evaluate a trained policy against its reference on held-out prompts.

    rlhf-ray eval RUN_OR_POLICY [key=value ...] [--config CONFIG] [--prompts PATH] [--reference MODEL]
                  [--judge RM_OR_FUNCTION] [--num-prompts N] [--max-new-tokens T] [--seed S]
                  [--samples K] [--device DEVICE] [--out DIR] [--study DB NAME]

RUN_OR_POLICY is a run folder (`runs/<name>`: its config.yaml and policy/, or the latest checkpoint's
policy while the run has none yet; for a pipeline that ended with DPO, its dpo/ against the DPO stage's
start) or, with --config, a policy folder or model name. The prompts are
`data.eval_dataset` of the config or --prompts (a JSONL/Parquet file read with the default field
names; chat-formatted when the policy's tokenizer has a template); when its records have a response,
it is the reference text of BLEU/ROUGE. The reference model is --reference, else `model.reference`,
else the initial policy `model.policy`; "{run}" in a path stands for the run folder. The judge of the
win rate is --judge, else the config's reward-model component, else the total reward.

Writes `eval.json`, `report.html` and its plots into --out (default `<run>/eval`, or `./eval` for a
bare policy). With --study, the results of a blind study people judged on /ui/eval (`rlhf-ray study
create`) go beside the automatic measures: the human win rate with its 95% Wilson interval, each
annotator's counts and Cohen's kappa, as "human" in eval.json and a section of report.html. Exit status: 0 done; 1 an input that cannot be evaluated (missing run, prompts, model,
a malformed data line), printed as one line; 2 a configuration error (by `rlhf_ray.cli.main`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.argtypes import positive_int
from rlhf_ray.config import RunConfig, load_config

EXIT_FAILED = 1
RUN_CONFIG = "config.yaml"
PIPELINE_CONFIG = "pipeline.yaml"  # `rlhf-ray pipeline`'s; a pipeline ending with DPO has no config.yaml


class EvalInputError(ValueError):
    """An evaluation target, dataset or model that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class EvalTarget:
    policy: str  # policy folder or model name
    config: RunConfig  # with "{run}" standing for `run_dir` when there is one
    run_dir: Path | None  # None: a bare policy


def run_policy(run_dir: Path) -> Path:
    """The trained policy of a run folder: policy/, else the latest complete checkpoint's policy."""
    from rlhf_ray.checkpoint import latest_checkpoint

    if (run_dir / "policy" / "config.json").is_file():
        return run_dir / "policy"
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and (checkpoint / "policy" / "config.json").is_file():
        print(f"rlhf-ray eval: {run_dir} has no policy/ yet; evaluating {checkpoint / 'policy'}", file=sys.stderr)
        return checkpoint / "policy"
    raise EvalInputError(f"run folder {run_dir} has no policy/ and no complete checkpoint with a policy; "
                         "has its training written one?")


def resolve_target(target: str, config_path: str | None, overrides: list[str]) -> EvalTarget:
    """What RUN_OR_POLICY names: a run folder (config from it, unless --config) or a bare policy (--config)."""
    from rlhf_ray.models.loading import BUILTIN_MODELS

    path = Path(target).expanduser()

    def run_config(name: str) -> RunConfig:
        config = load_config(config_path or path / name, overrides)
        # "{run}" is this folder wherever it now is, not the output_dir the run was started with
        return config.model_copy(update={"output_dir": str(path.parent), "name": path.name})

    if path.is_dir() and (path / RUN_CONFIG).is_file():
        return EvalTarget(str(run_policy(path)), run_config(RUN_CONFIG), path)
    if path.is_dir() and (path / PIPELINE_CONFIG).is_file() and (path / "dpo" / "summary.json").is_file():
        # a pipeline that ended with DPO: its policy against DPO's start, as a PPO run's against model.policy
        config = run_config(PIPELINE_CONFIG)
        start = config.dpo.base if config.dpo is not None else config.model.policy
        config = config.model_copy(update={"model": config.model.model_copy(update={"policy": start})})
        return EvalTarget(str(path / "dpo"), config, path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise EvalInputError(f"{path} is neither a run folder (no {RUN_CONFIG}) nor a policy folder (no config.json)")
    if not path.exists() and target not in BUILTIN_MODELS and (config_path is None or path.parent.is_dir()):
        # `runs/typo` names a missing folder in an existing one, not a hub id to look up
        raise EvalInputError(f"{target}: no such run folder (a run folder holds {RUN_CONFIG} and policy/)"
                             + ("" if config_path else "; to evaluate a policy folder or model name, pass --config"))
    if config_path is None:
        raise EvalInputError(f"{target} is a policy, not a run folder: pass --config CONFIG for its reward, "
                             "reference, sampling and prompts")
    return EvalTarget(target, load_config(config_path, overrides), None)


def eval_dataset(config: RunConfig, prompts_path: str | None, num_prompts: int | None):
    """The held-out dataset: --prompts, else `data.eval_dataset`; at most `num_prompts` records of it."""
    from rlhf_ray.data import DatasetConfig

    if prompts_path is not None:
        dataset = DatasetConfig(path=prompts_path)
    elif config.data.eval_dataset is not None:
        dataset = config.data.eval_dataset
        dataset = dataset.model_copy(update={"path": config.expand(dataset.path)})
    else:
        raise EvalInputError("no held-out prompts: pass --prompts PATH (JSONL or Parquet) or set "
                             "data.eval_dataset in the config")
    if num_prompts is not None:
        dataset = dataset.model_copy(update={"limit": min(num_prompts, dataset.limit or num_prompts)})
    return dataset


def has_responses(dataset) -> bool:
    """Whether the dataset's records carry `response_field`, judged by its first readable record.

    A JSONL record lacking it, or a columnar file without the column, means a prompt-only dataset; any
    other problem with the file is left for the loader to report with its file and line.
    """
    from rlhf_ray.data import DataError, iter_rows

    try:
        rows = iter_rows(dataset.path, [dataset.prompt_field, dataset.response_field], format=dataset.format,
                         split=dataset.split)
        first = next((row for row in rows if row.values is not None), None)
    except DataError:
        return False
    return first is not None and dataset.response_field in first.values


def load_eval_records(dataset, tokenizer) -> tuple[list[str], list[str], list[str] | None]:
    """The prompts chat-formatted for `tokenizer` (where it has a template, as training formats them), the
    prompts as the dataset has them, and their reference responses if it has them."""
    from rlhf_ray.data import format_records

    with_responses = has_responses(dataset)
    records = dataset.load_sft() if with_responses else dataset.load_prompts()
    formatted = format_records(records, tokenizer, dataset.chat_template)
    targets = [r.response for r in records] if with_responses else None
    return [r.prompt for r in formatted], [r.prompt for r in records], targets


def default_judge(reward_fn):
    """The config's reward-model component when its reward is a composite with one, else None (the total
    reward judges, which for a single reward-model reward is that model)."""
    from rlhf_ray.rewards.composite import CompositeReward
    from rlhf_ray.rewards.reward_model import RewardModelScorer

    composite = reward_fn.fn
    if not isinstance(composite, CompositeReward):
        return None
    for component in composite.components.values():
        if isinstance(component.fn, RewardModelScorer):
            return component
    return None


def check_same_vocabulary(tokenizer, reference_tokenizer, policy: str, reference: str) -> None:
    """KL compares the two models token by token: they must share a vocabulary."""
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise EvalInputError(f"the policy {policy} and the reference {reference} have different vocabularies; "
                             "the KL to the reference needs the same tokenizer (choose one with --reference)")


def training_metrics(run_dir: Path | None) -> tuple[list[dict] | None, str | None]:
    """The run's per-iteration metrics for the training plots, or None and why the plots are left out."""
    from rlhf_ray.evaluation.report import MetricsError, read_metrics

    if run_dir is None:
        return None, "A bare policy folder has no training metrics: the reward/KL-over-iterations plots are left out."
    path = run_dir / "metrics.jsonl"
    try:
        return read_metrics(path), None
    except FileNotFoundError:
        return None, f"{path} not found: the training plots are left out."
    except MetricsError as error:
        return None, f"{error}: the training plots are left out."


def run_eval(args):
    """Evaluate as the parsed arguments say and write the report; (path of report.html, EvalResult)."""
    from rlhf_ray.evaluation.evaluate import evaluate
    from rlhf_ray.evaluation.report import write_report
    from rlhf_ray.models.loading import DTYPES, load_policy, load_tokenizer
    from rlhf_ray.rewards import as_reward_function
    from rlhf_ray.rewards.composite import build_reward
    from rlhf_ray.pipeline.preflight import SAMPLE_PROMPTS, PreflightReport, check_reward_call, fixed_responses
    from rlhf_ray.rollout.run_sampler import reward_spec, sampling_params

    human = study_results(*args.study) if args.study else None  # a wrong database or name fails first
    target = resolve_target(args.target, args.config, args.overrides)
    config = target.config
    dataset = eval_dataset(config, args.prompts, args.num_prompts)
    reference_name = config.expand(args.reference or config.model.reference or config.model.policy)
    tokenizer = load_tokenizer(target.policy)
    check_same_vocabulary(tokenizer, load_tokenizer(reference_name), target.policy, reference_name)
    # data and reward errors show before the models load
    prompts, prompt_texts, targets = load_eval_records(dataset, tokenizer)
    reward_fn = build_reward(reward_spec(config), device=args.device)
    judge = (as_reward_function(config.expand(args.judge), device=args.device) if args.judge
             else default_judge(reward_fn))
    # the reward and the judge are called once on a few held-out prompts before the models load and sample
    sample = prompt_texts[:SAMPLE_PROMPTS]
    check_reward_call("reward", reward_fn, sample, fixed_responses(len(sample)), PreflightReport())
    if args.judge:
        check_reward_call("--judge", judge, sample, fixed_responses(len(sample)), PreflightReport())
    dtype = DTYPES[config.model.dtype]
    policy, _ = load_policy(target.policy, dtype=dtype, device=args.device)
    reference, _ = load_policy(reference_name, dtype=dtype, device=args.device)
    params = sampling_params(config)
    if args.max_new_tokens is not None:
        params = dataclasses.replace(params, max_new_tokens=args.max_new_tokens)
    seed = config.seed if args.seed is None else args.seed
    print(f"rlhf-ray eval: {target.policy} against {reference_name} on {len(prompts)} prompts of {dataset.path}",
          file=sys.stderr)
    result = evaluate(policy, reference, tokenizer, prompts, reward_fn, judge=judge, params=params, seed=seed,
                      targets=targets, max_length=config.rollout.max_length, prompt_texts=prompt_texts)

    metrics, note = training_metrics(target.run_dir)
    info = {"policy": target.policy, "reference": reference_name, "prompts": dataset.path,
            "num_prompts": len(prompts), "references_for_bleu_rouge": targets is not None, "reward": reward_fn.name,
            "judge": result.judge, "seed": seed, "sampling": dataclasses.asdict(params),
            "kl_estimator": "k1, on the policy's responses"}
    out_dir = Path(args.out) if args.out else (target.run_dir / "eval" if target.run_dir else Path("eval"))
    report = write_report(result, out_dir, info, metrics=metrics, metrics_note=note, samples=args.samples, human=human)
    return report, result, human


def study_results(db: str, name: str) -> dict:
    """A blind study's results from the feedback database, read-only (the server may be writing)."""
    from rlhf_ray.serve.db import FeedbackError
    from rlhf_ray.serve.feedback_store import FeedbackStore

    try:
        store = FeedbackStore(db, readonly=True)
    except (FileNotFoundError, RuntimeError) as err:
        raise EvalInputError(f"--study: {err}") from None
    try:
        return store.study_results(name)
    except FeedbackError as err:
        raise EvalInputError(f"--study: {db}: {err.message}") from None
    finally:
        store.close()


def print_summary(result) -> None:
    from rlhf_ray.evaluation.report import summary_rows

    rows = [("", "policy", "reference")] + summary_rows(result)
    width = max(len(label) for label, _, _ in rows)
    for label, policy, reference in rows:
        print(f"{label:<{width}}  {policy:>10}  {reference:>10}".rstrip())
    print(f"judge: {result.judge}; {len(result.samples)} prompts")


def cmd_eval(args) -> int:
    from rlhf_ray.data import DataError
    from rlhf_ray.errors import UserError, one_line
    from rlhf_ray.models.loading import ModelNotFoundError
    from rlhf_ray.rewards import RewardError

    try:
        report, result, human = run_eval(args)
    except (EvalInputError, DataError, RewardError, ModelNotFoundError, UserError) as error:
        print(f"rlhf-ray eval: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(result)
    if human:
        from rlhf_ray.evaluation.study import format_results

        print(format_results(human))
    print(f"report: {report}")
    return 0


def add_eval_commands(commands) -> None:
    """Add `eval` to the subparsers of `rlhf-ray`."""
    parser = commands.add_parser(
        "eval", help="evaluate a trained policy against its reference on held-out prompts",
        description="Sample the policy and its reference on held-out prompts with the same seeds; report mean "
                    "reward (and components), KL to the reference, win rate judged by the reward model, response "
                    "length and BLEU/ROUGE against the dataset's responses in eval.json and report.html.")
    parser.add_argument("target", metavar="RUN_OR_POLICY",
                        help="run folder (runs/<name>), or a policy folder or model name together with --config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. rollout.sampling.temperature=0.7")
    parser.add_argument("--config", default=None,
                        help="YAML run configuration (needed for a bare policy; for a run, used instead of "
                             "its config.yaml)")
    parser.add_argument("--prompts", default=None, metavar="PATH",
                        help="held-out prompts, JSONL or Parquet, with a 'prompt' and optionally a 'response' field "
                             "(default: data.eval_dataset of the config)")
    parser.add_argument("--reference", default=None, metavar="MODEL",
                        help="the model to compare with (default: model.reference, else the initial model.policy)")
    parser.add_argument("--judge", default=None, metavar="RM_OR_FUNCTION",
                        help="reward-model folder or module:function deciding the win rate "
                             "(default: the config's reward-model component, else the total reward)")
    parser.add_argument("--num-prompts", type=positive_int, default=None, metavar="N",
                        help="evaluate the first N prompts (default: all)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="T",
                        help="response token budget (default: rollout.max_new_tokens)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument("--samples", type=positive_int, default=8, metavar="K",
                        help="sample responses shown in the report (default 8; all are in eval.json)")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="report folder (default: <run>/eval, or ./eval for a bare policy)")
    parser.add_argument("--study", nargs=2, default=None, metavar=("DB", "NAME"),
                        help="add the human win rate of blind study NAME in feedback database DB (rlhf-ray study "
                             "create; judged on /ui/eval)")
    parser.set_defaults(func=cmd_eval)
