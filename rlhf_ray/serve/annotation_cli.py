"""The `annotators`, `queue` and `study` commands of `rlhf-ray`: who labels, and what they label.

    rlhf-ray annotators add NAME [--db DB]        register a person; prints their key (once)
    rlhf-ray annotators list [--db DB]
    rlhf-ray queue add NAME --pairs PAIRS.jsonl [--db DB] [--labels-per-item K]   pairs of `rlhf-ray label`
    rlhf-ray queue list [--db DB]
    rlhf-ray study create NAME --a SIDE --b SIDE --prompts FILE [--db DB] [--num-prompts N] ...
    rlhf-ray study results NAME [--db DB] [--json]

DB is the server's feedback database (`rlhf-ray serve --feedback-db`, default feedback.db); these commands
may run while the server does (SQLite lets them wait for its lock). Served completions with n >= 2 enter
the queue "served" by themselves. Exit status: 0 done, 1 an input that cannot be used (one line says why).
"""

from __future__ import annotations

import json
import sqlite3
import sys

from rlhf_ray.argtypes import positive_int

EXIT_FAILED = 1


def _store(db: str):
    """The feedback database, opened for writing, as a context that closes it."""
    from contextlib import closing

    from rlhf_ray.serve.feedback_store import FeedbackStore

    return closing(FeedbackStore(db))


def _run(command: str, action) -> int:
    from rlhf_ray.data import DataError
    from rlhf_ray.models.loading import ModelNotFoundError
    from rlhf_ray.serve.db import FeedbackError

    try:
        action()
    except FeedbackError as err:
        print(f"rlhf-ray {command}: {err.message}", file=sys.stderr)
        return EXIT_FAILED
    except (DataError, ModelNotFoundError, RuntimeError, sqlite3.DatabaseError, OSError) as err:
        print(f"rlhf-ray {command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_annotators(args) -> int:
    def act():
        with _store(args.db) as store:
            if args.action == "add":
                key = store.add_annotator(args.name)
                print(f"annotator {args.name} added to {args.db}; their key (shown once, keep it secret):\n{key}")
            else:
                for row in store.annotators():
                    print(f"{row['name']}\t{row['labels']} labels")

    return _run(f"annotators {args.action}", act)


def cmd_queue(args) -> int:
    def act():
        with _store(args.db) as store:
            if args.action == "add":
                from rlhf_ray.labeling import read_pairs

                pairs = read_pairs(args.pairs)
                items = [{"prompt": p.prompt, "response_a": p.response_a, "response_b": p.response_b,
                          "meta": {"pair_id": p.id, "pairs_file": str(args.pairs)}} for p in pairs]
                queue = store.add_queue(args.name, "pairs", args.description or f"pairs of {args.pairs}",
                                        args.labels_per_item, {"pairs_file": str(args.pairs)}, items)
                print(f"queue {queue['name']}: {queue['items']} items from {args.pairs}, "
                      f"{queue['labels_per_item']} label(s) each; label them at /ui/label?queue={queue['name']}")
            else:
                for q in store.queues():
                    print(f"{q['name']}\t{q['source']}\t{q['done']}/{q['items']} items complete\t{q['labels']} labels")

    return _run(f"queue {args.action}", act)


def cmd_study(args) -> int:
    def act():
        from rlhf_ray.evaluation.study import answers_of, format_results, study_items

        if args.action == "results":
            with _store(args.db) as store:
                results = store.study_results(args.name)
            print(json.dumps(results, indent=2) if args.json else format_results(results))
            return
        from rlhf_ray.data import load_prompts

        prompts = [r.prompt for r in load_prompts(args.prompts, limit=args.num_prompts)]
        answers = [answers_of(side, prompts, args.max_new_tokens, args.temperature, args.seed)
                   for side in (args.a, args.b)]
        items = study_items(prompts, *answers, seed=args.seed)
        spec = {"models": {"a": args.a, "b": args.b}, "prompts": args.prompts, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        with _store(args.db) as store:
            queue = store.add_queue(args.name, "study", f"{len(items)} prompts of {args.prompts}, two models, blind",
                                    args.labels_per_item, spec, items)
        print(f"study {queue['name']}: {queue['items']} items ({args.a} vs {args.b}, the order drawn per item), "
              f"{queue['labels_per_item']} judgement(s) each; judge them at /ui/eval?queue={queue['name']}")

    return _run(f"study {args.action}", act)


def add_annotation_commands(commands) -> None:
    """Add `annotators`, `queue` and `study` to the subparsers of `rlhf-ray`."""
    def db_option(parser):
        parser.add_argument("--db", default="feedback.db",
                            help="the server's feedback database (rlhf-ray serve --feedback-db; default feedback.db)")

    annotators = commands.add_parser("annotators", help="the people who label on the feedback pages")
    actions = annotators.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="register a person and print their key")
    add.add_argument("name", help="letters, digits, '_', '.', '-'")
    for parser in (add, actions.add_parser("list", help="the annotators and their label counts")):
        db_option(parser)
        parser.set_defaults(func=cmd_annotators)

    queue = commands.add_parser("queue", help="labelling queues of the feedback pages")
    actions = queue.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a queue of the pairs of `rlhf-ray label` (their pairs file)")
    add.add_argument("name")
    add.add_argument("--pairs", required=True, help="pairs file ({id, prompt, response_a, response_b} per line)")
    add.add_argument("--labels-per-item", type=positive_int, default=1, metavar="K",
                     help="people who label each item (default 1)")
    add.add_argument("--description", default=None, help="what the page header says about the queue")
    for parser in (add, actions.add_parser("list", help="the queues and their progress")):
        db_option(parser)
        parser.set_defaults(func=cmd_queue)

    study = commands.add_parser("study", help="blind side-by-side studies of two models")
    actions = study.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="answer a prompt set with two models; queue it for /ui/eval")
    create.add_argument("name")
    create.add_argument("--a", required=True, metavar="SIDE",
                        help="model a (the one whose win rate is reported): run folder, policy folder, model name, "
                             "or a JSONL file of {prompt, response}")
    create.add_argument("--b", required=True, metavar="SIDE", help="model b, as --a")
    create.add_argument("--prompts", required=True, help="JSONL or Parquet prompts ('prompt' field)")
    create.add_argument("--num-prompts", type=positive_int, default=None, metavar="N")
    create.add_argument("--max-new-tokens", type=positive_int, default=48, metavar="T")
    create.add_argument("--temperature", type=float, default=0.7)
    create.add_argument("--seed", type=int, default=0, help="sampling and A/B order seed")
    create.add_argument("--labels-per-item", type=positive_int, default=2, metavar="K",
                        help="people who judge each item (default 2: Cohen's kappa needs two)")
    results = actions.add_parser("results", help="win rate with its interval, per annotator, Cohen's kappa")
    results.add_argument("name")
    results.add_argument("--json", action="store_true", help="print the results as JSON")
    for parser in (create, results):
        db_option(parser)
        parser.set_defaults(func=cmd_study)
