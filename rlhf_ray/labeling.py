"""Preference labelling: sample two responses per prompt from a policy, have an annotator pick one.

    rlhf-ray label --policy MODEL --prompts FILE --out PREFS.jsonl --annotator SPEC [--pairs PAIRS.jsonl] ...

This is how a run gets comparisons without a server (Ziegler et al. 2019; Ouyang et al. 2022: labellers
compare samples of the current policy). Two steps:

1. Sampling: each prompt gets two responses drawn with different seeds (`episode_seed(seed, 0, i)` and
   `episode_seed(seed, 1, i)`), so the same seed gives the same pairs file. The prompt is sampled in
   the policy's chat template when its tokenizer has one; the pairs file keeps the raw prompt, since the
   data loaders apply the template when the dataset is used. A pair whose two responses are the same
   text, or one of them blank, is left out and counted: a comparison needs two different texts.
   Lines of the pairs file: `{"id": "00007-3fa2c1d0", "prompt": ..., "response_a": ..., "response_b": ...}`.
   The id is the prompt's index and a hash of the three texts, so a label written for one sampling
   cannot be applied to the responses of another (it is an unknown id there).
2. Labelling, by an `Annotator` named by a spec (`ANNOTATORS` maps the part before the first ':' to a
   factory; add one there to plug in another kind):
   - `scripted:package.module:function` or `scripted:REWARD_MODEL_FOLDER`: scores both responses with
     the reward function (given the prompt as the policy saw it, as in PPO) and prefers the higher;
     a difference <= `margin` is a tie;
   - `human:LABELS.jsonl`: a person's labels, one line per pair `{"id": ..., "choice": "a"|"b"|"tie"}`.
     Pairs without a line stay unlabelled; the command says how many and where the pairs are, so the
     person labels them and runs it again. A missing labels file means nothing is labelled yet.

The preference dataset (`{"prompt", "chosen", "rejected", "id", "annotator"}` per line, readable by
`rlhf_ray.data.load_preferences`) is written to a temporary file and renamed, so a crash never leaves
half of one. Ties and unlabelled pairs are counted, not written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from rlhf_ray.argtypes import non_negative_float, positive_float, positive_int
from rlhf_ray.data import DataError, format_prompt, iter_rows, load_prompts, use_chat_template
from rlhf_ray.rewards import RewardError, as_reward_function

Choice = Literal["a", "b", "tie"] | None  # None: not labelled (yet)
CHOICES = ("a", "b", "tie")
PAIR_FIELDS = ("id", "prompt", "response_a", "response_b")
SAMPLING_BATCH_PROMPTS = 32  # prompts per `Sampler.generate` call (two episodes each)


class AnnotatorError(ValueError):
    """An annotator spec that cannot be built, or an annotator that did not return one choice per pair."""


@dataclass(frozen=True)
class Pair:
    """Two responses of the policy to one raw (not chat-formatted) prompt."""

    id: str
    prompt: str
    response_a: str
    response_b: str


@dataclass(frozen=True)
class SampledPairs:
    pairs: list[Pair]
    identical: int  # prompts left out because both responses were the same text
    blank: int  # prompts left out because a response was blank (EOS at once, or whitespace only)


def pair_id(index: int, prompt: str, response_a: str, response_b: str) -> str:
    """`<prompt index>-<8 hex digits of a hash of the texts>`: stable for the same sampling, different otherwise."""
    digest = hashlib.sha1("\0".join((prompt, response_a, response_b)).encode("utf-8")).hexdigest()[:8]
    return f"{index:05d}-{digest}"


# --- Step 1: sampling ---------------------------------------------------------------------------------

def sample_pairs(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, temperature: float = 1.0,
                 seed: int = 0, chat_template: bool | None = None, dialogue=None) -> SampledPairs:
    """Two responses per prompt, drawn with seeds `episode_seed(seed, 0, i)` and `episode_seed(seed, 1, i)`.

    `chat_template=None` samples in the tokenizer's chat template when it has one. Which prompts share a
    batch does not change any response (each episode's randomness comes from its own seed). `dialogue`
    (`DialogueParams`): each response is a whole conversation with the task's user or tool, as a transcript.
    """
    from rlhf_ray.rollout.sampler import Sampler, SamplingParams, episode_seed

    chat = use_chat_template(tokenizer, chat_template)
    sampler = Sampler(model, tokenizer, lambda p, r: [0.0] * len(r),  # no reward is needed to sample
                      SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, dialogue=dialogue))
    pairs, identical, blank = [], 0, 0
    for start in range(0, len(prompts), SAMPLING_BATCH_PROMPTS):
        chunk = range(start, min(start + SAMPLING_BATCH_PROMPTS, len(prompts)))
        ids = [tokenizer(format_prompt(tokenizer, prompts[i], chat), add_special_tokens=False)["input_ids"]
               for i in chunk]
        seeds = [episode_seed(seed, 0, i) for i in chunk] + [episode_seed(seed, 1, i) for i in chunk]
        episodes = sampler.generate(ids + ids, seeds)  # first the a responses, then the b responses
        for offset, i in enumerate(chunk):
            a, b = episodes[offset].response, episodes[offset + len(chunk)].response
            if a == b:
                identical += 1
            elif not a.strip() or not b.strip():
                blank += 1
            else:
                pairs.append(Pair(pair_id(i, prompts[i], a, b), prompts[i], a, b))
    return SampledPairs(pairs, identical, blank)


def write_pairs(pairs: Iterable[Pair], path: str | os.PathLike) -> Path:
    """The pairs as JSONL, written atomically."""
    return write_jsonl_atomic(({field: getattr(pair, field) for field in PAIR_FIELDS} for pair in pairs), path)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a pairs file; a malformed line or a repeated id raises `DataError` naming file:line."""
    pairs, seen = [], {}
    for row in iter_rows(path, PAIR_FIELDS, format="jsonl"):
        if row.values is None:
            raise DataError(f"{row.where}: {row.problem}")
        for field in PAIR_FIELDS:
            if not isinstance(row.values.get(field), str) or not row.values[field].strip():
                raise DataError(f"{row.where}: field {field!r} is missing or not a non-blank string; "
                                f"expected a pair with fields {', '.join(PAIR_FIELDS)}")
        pair = Pair(*(row.values[field] for field in PAIR_FIELDS))
        if pair.id in seen:
            raise DataError(f"{row.where}: id {pair.id!r} repeats the pair of {seen[pair.id]}")
        seen[pair.id] = row.where
        pairs.append(pair)
    return pairs


# --- Step 2: annotators -------------------------------------------------------------------------------

class Annotator(Protocol):
    name: str  # written into each record's "annotator" field

    def label(self, pairs: Sequence[Pair]) -> list[Choice]:
        """One choice per pair: "a", "b", "tie", or None for a pair it has no label for."""


class ScriptedAnnotator:
    """Prefers the response a reward function scores higher; a difference <= `margin` is a tie.

    `prompt_format` turns the raw prompt into the text the reward function sees: the chat-formatted
    prompt the policy sampled from, which is what the reward gets in PPO.
    """

    def __init__(self, reward, margin: float = 0.0, prompt_format: Callable[[str], str] | None = None,
                 name: str | None = None):
        if margin < 0:
            raise AnnotatorError(f"margin must be >= 0, got {margin}")
        self.reward_fn = as_reward_function(reward)
        self.margin = margin
        self.prompt_format = prompt_format or (lambda prompt: prompt)
        self.name = name or f"scripted:{self.reward_fn.name}"

    def label(self, pairs: Sequence[Pair]) -> list[Choice]:
        prompts = [self.prompt_format(pair.prompt) for pair in pairs]
        scores = self.reward_fn(prompts + prompts, [p.response_a for p in pairs] + [p.response_b for p in pairs])
        difference = scores[:len(pairs)] - scores[len(pairs):]  # (n,) r(a) - r(b), one batched reward call
        return ["tie" if abs(d) <= self.margin else "a" if d > 0 else "b" for d in difference]


class HumanAnnotator:
    """A person's labels from a JSONL file: `{"id": PAIR_ID, "choice": "a"|"b"|"tie"}` per line.

    A line that is not JSON, names an id that is not among the pairs, repeats an id, or has another
    choice raises `DataError` naming file:line. A missing file means no pair is labelled yet.
    """

    def __init__(self, labels_path: str | os.PathLike):
        self.labels_path = Path(labels_path)
        self.name = f"human:{labels_path}"

    def read_labels(self, known_ids: set[str]) -> dict[str, str]:
        """id -> choice of every line of the labels file."""
        labels, where_of = {}, {}
        if not self.labels_path.exists():
            return labels
        for row in iter_rows(self.labels_path, ("id", "choice"), format="jsonl"):
            if row.values is None:
                raise DataError(f"{row.where}: {row.problem}")
            pair_id, choice = row.values.get("id"), row.values.get("choice")
            if pair_id not in known_ids:
                raise DataError(f"{row.where}: id {pair_id!r} is not among the {len(known_ids)} pairs being "
                                "labelled; expected the id of a line of the pairs file")
            if choice not in CHOICES:
                raise DataError(f"{row.where}: choice {choice!r} of id {pair_id!r}; expected one of "
                                f"{', '.join(map(repr, CHOICES))}")
            if pair_id in labels:
                raise DataError(f"{row.where}: id {pair_id!r} is labelled again (first at {where_of[pair_id]}); "
                                "expected one label per pair")
            labels[pair_id], where_of[pair_id] = choice, row.where
        return labels

    def label(self, pairs: Sequence[Pair]) -> list[Choice]:
        labels = self.read_labels({pair.id for pair in pairs})
        return [labels.get(pair.id) for pair in pairs]


def _scripted(target: str, margin: float, prompt_format: Callable[[str], str] | None) -> ScriptedAnnotator:
    return ScriptedAnnotator(target, margin=margin, prompt_format=prompt_format, name=f"scripted:{target}")


def _human(target: str, margin: float, prompt_format: Callable[[str], str] | None) -> HumanAnnotator:
    return HumanAnnotator(target)


# kind -> factory(target, margin, prompt_format); the spec is "kind:target"
ANNOTATORS: dict[str, Callable[[str, float, Callable[[str], str] | None], Annotator]] = {
    "scripted": _scripted,
    "human": _human,
}


def make_annotator(spec: str, margin: float = 0.0, prompt_format: Callable[[str], str] | None = None) -> Annotator:
    """The annotator of `"kind:target"`, e.g. `scripted:envs.builtin:sentiment_reward` or `human:labels.jsonl`.

    `margin` and `prompt_format` are for scripted annotators; a person decides ties themselves.
    """
    kind, sep, target = spec.partition(":")
    if kind not in ANNOTATORS or not sep or not target:
        raise AnnotatorError(f"annotator {spec!r}: expected 'kind:target' with kind one of "
                             f"{', '.join(sorted(ANNOTATORS))} (scripted:package.module:function, "
                             "scripted:REWARD_MODEL_FOLDER, human:LABELS.jsonl)")
    try:
        return ANNOTATORS[kind](target, margin, prompt_format)
    except RewardError as error:
        raise AnnotatorError(f"annotator {spec!r}: {error}") from None


# --- Labelling and the preference dataset -------------------------------------------------------------

@dataclass(frozen=True)
class LabelResult:
    records: list[dict]  # {"prompt", "chosen", "rejected", "id", "annotator"} of each decided pair
    ties: int
    unlabelled: int


def label_pairs(pairs: Sequence[Pair], annotator: Annotator) -> LabelResult:
    """The preference records of the pairs the annotator decided; ties and unlabelled pairs are counted."""
    choices = annotator.label(pairs) if pairs else []
    if len(choices) != len(pairs):
        raise AnnotatorError(f"annotator {annotator.name!r} returned {len(choices)} choices for {len(pairs)} pairs; "
                             "expected one per pair")
    records, ties, unlabelled = [], 0, 0
    for pair, choice in zip(pairs, choices):
        if choice is None:
            unlabelled += 1
        elif choice == "tie":
            ties += 1
        elif choice in ("a", "b"):
            chosen, rejected = ((pair.response_a, pair.response_b) if choice == "a"
                                else (pair.response_b, pair.response_a))
            records.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "id": pair.id,
                            "annotator": annotator.name})
        else:
            raise AnnotatorError(f"annotator {annotator.name!r} returned choice {choice!r} for pair {pair.id!r}; "
                                 "expected 'a', 'b', 'tie' or None")
    return LabelResult(records, ties, unlabelled)


def write_jsonl_atomic(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """One JSON object per line, written to a temporary file beside `path` and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_preferences(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """The preference dataset, atomically; `rlhf_ray.data.load_preferences(path)` reads it."""
    return write_jsonl_atomic(records, path)


# --- The command ----------------------------------------------------------------------------------------

def default_pairs_path(out: str | os.PathLike) -> Path:
    """`prefs.jsonl` -> `prefs.pairs.jsonl`, beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.pairs.jsonl")


def _pairs_for(args, pairs_path: Path, tokenizer) -> list[Pair]:
    """The pairs to label: read from --pairs when that file exists, else sampled and written to `pairs_path`."""
    from rlhf_ray.models import load_policy

    if args.pairs is not None and pairs_path.exists():
        pairs = read_pairs(pairs_path)
        print(f"pairs: {len(pairs)} read from {pairs_path} (delete it to sample again)")
        return pairs
    prompts = [r.prompt for r in load_prompts(args.prompts, field=args.prompt_field, limit=args.num_prompts)]
    model, _ = load_policy(args.policy)
    dialogue = None
    if args.dialogue is not None:
        from rlhf_ray.rollout.sampler import DialogueParams

        dialogue = DialogueParams(args.dialogue, max_turns=args.max_turns)
    sampled = sample_pairs(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, dialogue=dialogue)
    write_pairs(sampled.pairs, pairs_path)
    print(f"pairs: {len(sampled.pairs)} of {len(prompts)} prompts sampled to {pairs_path} "
          f"({sampled.identical} left out with identical responses, {sampled.blank} with a blank one)")
    return sampled.pairs


def cmd_label(args) -> int:
    """Sample pairs (or read --pairs), label them with --annotator, write --out; 0 done, 1 a data/annotator error."""
    from rlhf_ray.errors import UserError, one_line
    from rlhf_ray.models import ModelNotFoundError, load_tokenizer
    from rlhf_ray.pipeline.preflight import SAMPLE_PROMPTS, PreflightReport, check_reward_call, fixed_responses

    pairs_path = Path(args.pairs) if args.pairs is not None else default_pairs_path(args.out)
    try:
        tokenizer = load_tokenizer(args.policy)
        prompt_format = None
        if use_chat_template(tokenizer, None):  # the reward sees the prompt as the policy did, as in PPO
            prompt_format = lambda prompt: format_prompt(tokenizer, prompt, chat=True)  # noqa: E731
        annotator = make_annotator(args.annotator, margin=args.margin, prompt_format=prompt_format)
        if isinstance(annotator, ScriptedAnnotator):  # its reward is called once before anything is sampled
            sample = [annotator.prompt_format(r.prompt) for r in
                      load_prompts(args.prompts, field=args.prompt_field, limit=SAMPLE_PROMPTS)]
            check_reward_call("--annotator", annotator.reward_fn, sample, fixed_responses(len(sample)),
                              PreflightReport())
        pairs = _pairs_for(args, pairs_path, tokenizer)
        result = label_pairs(pairs, annotator)
        if result.records:
            write_preferences(result.records, args.out)
    except (DataError, AnnotatorError, RewardError, ModelNotFoundError, UserError) as error:
        print(f"rlhf-ray: {one_line(error)}", file=sys.stderr)
        return 1
    labelled = len(result.records) + result.ties
    where = f"to {args.out}" if result.records else f"({args.out} not written: no pair decided)"
    print(f"pairs {len(pairs)}, labelled {labelled}, ties {result.ties}, unlabelled {result.unlabelled}, "
          f"written {len(result.records)} {where}")
    if result.unlabelled and isinstance(annotator, HumanAnnotator):
        rerun = "" if args.pairs is not None else f" (add --pairs {pairs_path} to reuse them without sampling)"
        print(f"{result.unlabelled} pairs remain to label: for the pairs in {pairs_path}, add lines "
              f'{{"id": ..., "choice": "a"|"b"|"tie"}} to {annotator.labels_path}, then run this command again{rerun}')
    return 0


def add_label_commands(subparsers) -> None:
    """Adds `label` to the `rlhf-ray` subparsers."""
    label = subparsers.add_parser(
        "label", help="sample response pairs from a policy and label them into a preference dataset",
        description="Sample two responses per prompt from --policy, label each pair with --annotator, and write "
                    "the (prompt, chosen, rejected) dataset to --out. Exit 0 done, 1 a data or annotator error.")
    label.add_argument("--policy", required=True, help="model folder or name, e.g. rlhf-ray/tiny-gpt2")
    label.add_argument("--prompts", required=True, help="prompt dataset (JSONL, Parquet or a `datasets` folder)")
    label.add_argument("--out", required=True, help="the preference dataset to write (JSONL)")
    label.add_argument("--annotator", required=True, metavar="SPEC",
                       help="scripted:package.module:function, scripted:REWARD_MODEL_FOLDER or human:LABELS.jsonl")
    label.add_argument("--pairs", default=None, metavar="PATH",
                       help="the pairs file; read when it exists, else sampled into it "
                            "(default: <out stem>.pairs.jsonl beside --out, sampled every run)")
    label.add_argument("--prompt-field", default="prompt", help="the prompt field of --prompts (default: prompt)")
    label.add_argument("--num-prompts", type=positive_int, default=None, help="the first N prompts (default: all)")
    label.add_argument("--max-new-tokens", type=positive_int, default=16)
    label.add_argument("--temperature", type=positive_float, default=1.0)
    label.add_argument("--seed", type=int, default=0, help="the same seed gives the same pairs (default: 0)")
    label.add_argument("--dialogue", default=None, metavar="TASK",
                       help="sample whole conversations with a task's user or tool (refund, calculator or "
                            "module:name; --max-new-tokens is then one turn's)")
    label.add_argument("--max-turns", type=positive_int, default=3, help="assistant turns of a --dialogue (default: 3)")
    label.add_argument("--margin", type=non_negative_float, default=0.0,
                       help="scripted annotators: a score difference <= margin is a tie (default: 0.0)")
    label.set_defaults(func=cmd_label)
