"""`rlhf-ray label`: sampled response pairs, scripted and human annotators, the preference dataset they write."""

import argparse
import json

import numpy as np
import pytest

from envs.builtin import sentiment_reward, sentiment_score
from rlhf_ray.data import load_preferences
from rlhf_ray.labeling import (
    AnnotatorError, HumanAnnotator, Pair, ScriptedAnnotator, add_label_commands, label_pairs, make_annotator,
    sample_pairs, write_pairs,
)
from rlhf_ray.models import load_policy

POLICY = "rlhf-ray/tiny-gpt2"
PROMPTS = "experiments/data/prompts.jsonl"
SENTIMENT = "envs.builtin:sentiment_reward"


def run_label(*argv: str) -> int:
    """The `label` command as `rlhf-ray label ARGV...` runs it."""
    parser = argparse.ArgumentParser(prog="rlhf-ray")
    add_label_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["label", *argv])
    return args.func(args)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def human_pairs(tmp_path_factory):
    """A pairs file sampled by the command for 12 toy prompts; no labels yet."""
    folder = tmp_path_factory.mktemp("human")
    assert run_label("--policy", POLICY, "--prompts", PROMPTS, "--out", str(folder / "prefs.jsonl"),
                     "--annotator", f"human:{folder / 'labels.jsonl'}", "--num-prompts", "12") == 0
    return folder / "prefs.pairs.jsonl"


def test_scripted_annotator_prefers_the_higher_sentiment(tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    assert run_label("--policy", POLICY, "--prompts", PROMPTS, "--out", str(out), "--annotator",
                     f"scripted:{SENTIMENT}", "--num-prompts", "16") == 0

    records = load_preferences(out)
    assert len(records) >= 6
    for record in records:
        assert sentiment_score(record.chosen) > sentiment_score(record.rejected)
    rows = read_jsonl(out)
    assert {row["annotator"] for row in rows} == {f"scripted:{SENTIMENT}"}
    pairs = read_jsonl(tmp_path / "prefs.pairs.jsonl")  # the default pairs file, beside --out
    assert {row["id"] for row in rows} <= {pair["id"] for pair in pairs}
    assert f"written {len(records)}" in capsys.readouterr().out


def test_pairs_keep_the_raw_prompt_and_two_different_responses(human_pairs):
    raw_prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)][:12]
    pairs = read_jsonl(human_pairs)
    assert pairs
    for pair in pairs:
        assert set(pair) == {"id", "prompt", "response_a", "response_b"}
        assert pair["prompt"] == raw_prompts[int(pair["id"].split("-")[0])]
        assert pair["response_a"] != pair["response_b"]


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY)


def test_same_seed_gives_the_same_pairs_file(policy, tmp_path):
    prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)][:6]

    def pairs_file(name: str, seed: int) -> bytes:
        return write_pairs(sample_pairs(*policy, prompts, seed=seed).pairs, tmp_path / name).read_bytes()

    first = pairs_file("first.jsonl", 3)
    assert first == pairs_file("again.jsonl", 3)
    assert first != pairs_file("other.jsonl", 4)


def test_identical_responses_are_left_out_and_counted(policy):
    prompts = ["today the team is", "the food was"]
    # at a near-zero temperature both seeds draw the most likely token every step
    sampled = sample_pairs(*policy, prompts, max_new_tokens=6, temperature=1e-4)
    assert sampled.pairs == [] and sampled.identical == len(prompts)


def test_human_labels_choose_the_chosen_texts_and_count_the_rest(human_pairs, tmp_path, capsys):
    pairs = read_jsonl(human_pairs)
    assert len(pairs) >= 4
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": p["id"], "choice": c}) + "\n"
                              for p, c in zip(pairs, ["a", "b", "tie"])))
    out = tmp_path / "prefs.jsonl"
    assert run_label("--policy", POLICY, "--prompts", PROMPTS, "--out", str(out), "--pairs", str(human_pairs),
                     "--annotator", f"human:{labels}") == 0

    rows = read_jsonl(out)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [
        (pairs[0]["id"], pairs[0]["response_a"], pairs[0]["response_b"]),
        (pairs[1]["id"], pairs[1]["response_b"], pairs[1]["response_a"]),
    ]
    assert len(load_preferences(out)) == 2
    printed = capsys.readouterr().out
    assert f"unlabelled {len(pairs) - 3}" in printed and "ties 1" in printed
    assert f"{len(pairs) - 3} pairs remain to label" in printed and str(human_pairs) in printed


def test_without_a_labels_file_nothing_is_written_and_all_pairs_remain(human_pairs, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    assert run_label("--policy", POLICY, "--prompts", PROMPTS, "--out", str(out), "--pairs", str(human_pairs),
                     "--annotator", f"human:{tmp_path / 'not-yet.jsonl'}") == 0
    assert not out.exists()
    assert f"{len(read_jsonl(human_pairs))} pairs remain to label" in capsys.readouterr().out


@pytest.mark.parametrize("bad_line, problem", [
    ('{"id": "00001-x", "choice": "a"', "not valid JSON"),
    ('{"id": "no-such-pair", "choice": "a"}', "'no-such-pair' is not among"),
    ('{"id": "FIRST", "choice": "left"}', "choice 'left'"),
    ('{"id": "FIRST", "choice": "b"}', "labelled again (first at"),
])
def test_malformed_label_line_is_an_error_naming_file_and_line(human_pairs, tmp_path, capsys, bad_line, problem):
    first_id = read_jsonl(human_pairs)[0]["id"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"id": first_id, "choice": "a"}) + "\n" + bad_line.replace("FIRST", first_id) + "\n")
    assert run_label("--policy", POLICY, "--prompts", PROMPTS, "--out", str(tmp_path / "prefs.jsonl"),
                     "--pairs", str(human_pairs), "--annotator", f"human:{labels}") == 1
    error = capsys.readouterr().err
    assert f"{labels}:2:" in error and problem in error
    assert len(error.strip().splitlines()) == 1


def test_scripted_difference_within_the_margin_is_a_tie():
    pairs = [Pair("1", "p", "good good", "bad bad"), Pair("2", "p", "good day", "great day"),
             Pair("3", "p", "sad day", "happy day")]
    choices = ScriptedAnnotator(sentiment_reward, margin=0.1).label(pairs)
    assert choices == ["a", "tie", "b"]
    result = label_pairs(pairs, ScriptedAnnotator(sentiment_reward, margin=0.1))
    assert [r["id"] for r in result.records] == ["1", "3"] and result.ties == 1 and result.unlabelled == 0


def test_scripted_reward_sees_the_formatted_prompt():
    seen = []

    def reward(prompts, responses):
        seen.extend(prompts)
        return np.zeros(len(responses))

    ScriptedAnnotator(reward, prompt_format=lambda p: f"<user>{p}<assistant>").label([Pair("1", "hi", "a", "b")])
    assert seen == ["<user>hi<assistant>"] * 2


@pytest.mark.parametrize("spec", ["oracle:x", "scripted:", "human", "scripted:no_such_module_xyz:f"])
def test_unknown_or_broken_annotator_spec_is_an_error(spec):
    with pytest.raises(AnnotatorError, match="annotator"):
        make_annotator(spec)


def test_annotator_returning_the_wrong_number_of_choices_is_an_error():
    class Lazy:
        name = "lazy"

        def label(self, pairs):
            return ["a"]

    with pytest.raises(AnnotatorError, match="1 choices for 2 pairs"):
        label_pairs([Pair("1", "p", "x", "y"), Pair("2", "p", "x", "z")], Lazy())


def test_human_annotator_reads_labels_by_id(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"id": "2", "choice": "b"}\n\n{"id": "1", "choice": "tie"}\n')
    pairs = [Pair("1", "p", "x", "y"), Pair("2", "p", "x", "z"), Pair("3", "p", "y", "z")]
    assert HumanAnnotator(labels).label(pairs) == ["tie", "b", None]
