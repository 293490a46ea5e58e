"""The `rlhf-ray` command line.

    rlhf-ray train CONFIG [key=value ...] [--address ADDR]   run PPO; outputs in runs/<name>/
    rlhf-ray pipeline CONFIG [key=value ...]  SFT -> reward and satisfaction models -> PPO (or SFT -> DPO), finished
                                              stages skipped
    rlhf-ray config CONFIG [key=value ...]     print the resolved configuration
    rlhf-ray submit CONFIG --address http://HEAD:8265 [--no-wait] [key=value ...]   train as a Ray Job
    rlhf-ray jobs status|logs|stop|list ...    follow submitted jobs
    rlhf-ray scale RUN --rollout-workers K     change a running run's rollout workers
    rlhf-ray label --policy MODEL --prompts FILE --out PREFS.jsonl --annotator SPEC   sample pairs, label them
    rlhf-ray eval RUN_OR_POLICY [--prompts PATH ...]   held-out reward, KL, win rate, BLEU/ROUGE; report.html
    rlhf-ray sample CONFIG [key=value ...]     sample a batch of episodes from the policy and score them
    rlhf-ray serve POLICY [--port P --replicas MIN:MAX --api-key KEY]   OpenAI-compatible server + feedback
    rlhf-ray feedback export DB [--out DIR]   preferences, ratings and studies of the feedback, with lineage
    rlhf-ray annotators add NAME [--db DB]     a person's key for the feedback pages (/ui/label, /ui/chat, /ui/eval)
    rlhf-ray queue add NAME --pairs FILE       a labelling queue of pairs; `queue list` shows progress
    rlhf-ray study create NAME --a X --b Y --prompts FILE   a blind study of two models; `study results NAME`

Configuration errors (unknown key, wrong type, missing file) print one message naming the key and
exit with status 2, the habit of command-line tools for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhf_ray.config import ConfigError, dump_config, load_config
from rlhf_ray.serve.cli import add_serve_commands

EXIT_USAGE = 2


def _add_config_arguments(parser: argparse.ArgumentParser, runs: bool = False) -> None:
    """The configuration and its overrides; `runs`: the command runs on Ray (a cluster to join)."""
    parser.add_argument("config", help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. rollout.batch_size=64")
    if runs:
        parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")


def cmd_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def run_failed(err: Exception) -> int:
    """A run that cannot go on: where its traceback is (if it was kept), then the cause as the last line."""
    from rlhf_ray.errors import one_line

    log = getattr(err, "log", None)
    if log:
        print(f"rlhf-ray: the traceback is in {log}", file=sys.stderr)
    print(f"rlhf-ray: {one_line(err)}", file=sys.stderr)
    return 1


def cmd_train(args) -> int:
    from rlhf_ray.errors import RunStopped
    from rlhf_ray.pipeline.train import TrainingError, train

    config = load_config(args.config, args.overrides)
    try:
        run_dir = train(config, address=args.address, fresh=args.fresh)
    except ConfigError:
        raise
    except (TrainingError, RunStopped) as err:
        return run_failed(err)
    _print_reward_line(run_dir / "metrics.jsonl")
    print(f"run folder: {run_dir}  (policy: {run_dir / 'policy'})")
    return 0


def _print_reward_line(metrics: Path) -> None:
    """`reward a -> b, kl k after N iterations`, then the held-out line when the run evaluated (eval_every)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [row for row in rows if "rollout/reward_mean" in row]
    first, last = trained[0], trained[-1]
    kl = f", kl {last['objective/kl']:.3f}" if "objective/kl" in last else ""
    print(f"reward {first['rollout/reward_mean']:+.3f} -> {last['rollout/reward_mean']:+.3f}{kl} "
          f"after {last['iteration']} iterations")
    held_out = [row for row in rows if "eval/reward_mean" in row]
    if len(held_out) > 1:
        print(f"held-out reward {held_out[0]['eval/reward_mean']:+.3f} (iteration {held_out[0]['iteration']}) -> "
              f"{held_out[-1]['eval/reward_mean']:+.3f} (iteration {held_out[-1]['iteration']}), "
              f"kl to the reference {held_out[-1].get('eval/kl', float('nan')):.3f}")


def cmd_pipeline(args) -> int:
    from rlhf_ray.errors import RunStopped
    from rlhf_ray.pipeline.stages import run_pipeline
    from rlhf_ray.pipeline.train import TrainingError
    from rlhf_ray.stages import StageError

    config = load_config(args.config, args.overrides)
    try:
        status = run_pipeline(config, address=args.address, stages=tuple(args.stages.split(",")))
    except ConfigError:
        raise
    except (StageError, TrainingError, RunStopped) as err:
        return run_failed(err)
    print("stages: " + ", ".join(f"{stage} {state}" for stage, state in status.items() if state != "absent"))
    if status.get("ppo") == "ran":
        _print_reward_line(Path(config.run_dir) / "metrics.jsonl")
    print(f"run folder: {config.run_dir}")
    return 0


def cmd_sample(args) -> int:
    from rlhf_ray.rollout.run_sampler import sample_from_config

    config = load_config(args.config, args.overrides)
    episodes = sample_from_config(config)
    width = max(len(e.prompt) for e in episodes)
    for episode in episodes:
        end = "eos" if episode.eos else "cut"
        print(f"{episode.reward:+.3f}  {end}  {episode.prompt:<{width}} | {episode.response}")
    mean = sum(e.reward for e in episodes) / len(episodes)
    tokens = sum(len(e.response_ids) for e in episodes)
    print(f"{len(episodes)} episodes, {tokens} response tokens, mean reward {mean:+.4f}")
    return 0


def cmd_scale(args) -> int:
    from rlhf_ray.pipeline.scale import scale

    try:
        status = scale(args.run, args.rollout_workers, address=args.address)
    except (ValueError, ConnectionError) as err:
        print(f"rlhf-ray: {err}", file=sys.stderr)
        return 1
    print(f"run {status['run']}: rollout workers target {status['target']} (now {status['workers']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func, config: bool = True, runs: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(func=func)
        if config:
            _add_config_arguments(sub, runs)
        return sub

    command("train", "run PPO as configured", cmd_train, runs=True).add_argument(
        "--fresh", action="store_true",
        help="start over, deleting the run folder's checkpoints and metrics (default: resume)")
    command("pipeline", "run SFT, reward model, DPO and PPO in order, skipping finished stages", cmd_pipeline,
            runs=True).add_argument("--stages", default="sft,reward_model,satisfaction_model,dpo,ppo",
                                    help="comma-separated stages to run (default: every stage the config has)")
    command("config", "print the resolved configuration", cmd_config)
    command("sample", "sample and score a batch of episodes from the policy", cmd_sample)
    resize = command("scale", "change a running run's number of rollout workers", cmd_scale, config=False)
    resize.add_argument("run", help="the run's name (config key `name`)")
    resize.add_argument("--rollout-workers", type=int, required=True)
    resize.add_argument("--address", default="auto", help="the Ray cluster the run is on (default: auto)")
    from rlhf_ray.evaluation.cli import add_eval_commands
    from rlhf_ray.jobs.cli import add_job_commands
    from rlhf_ray.labeling import add_label_commands
    from rlhf_ray.loop.cli import add_loop_commands
    from rlhf_ray.serve.annotation_cli import add_annotation_commands

    add_job_commands(commands)
    add_serve_commands(commands)
    add_label_commands(commands)
    add_annotation_commands(commands)
    add_eval_commands(commands)
    add_loop_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the options (`train CONFIG --fresh a.b=1`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"rlhf-ray: config error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
