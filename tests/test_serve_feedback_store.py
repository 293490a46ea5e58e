"""The SQLite feedback store and its export for reward-model training. No Ray."""

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.serve.feedback_export import export_feedback
from rlhf_ray.serve.feedback_store import ChoiceRecord, CompletionRecord, FeedbackError, FeedbackStore


def completion(id, responses, prompts=("the movie was",), version="v3-abc"):
    n = len(responses) // len(prompts)
    choices = [ChoiceRecord(i, i // n, prompts[i // n], text, "stop") for i, text in enumerate(responses)]
    return CompletionRecord(id, 1000.0, "tiny", version, "completions", choices, {"temperature": 1.0})


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    yield store
    store.close()


def test_database_is_in_wal_mode_with_full_sync(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_rating_copies_prompt_response_version_and_time(store):
    store.record_completions([completion("c1", [" good", " bad"])])
    ack = store.add_feedback("c1", rating=4, choice_index=1, comment="meh")
    assert ack["kind"] == "rating" and ack["completion_id"] == "c1"
    [record] = store.feedback_records()
    assert (record["prompt"], record["response"], record["rating"], record["comment"]) == \
        ("the movie was", " bad", 4, "meh")
    assert record["policy_version"] == "v3-abc" and record["created"] > 0


def test_preference_rejects_the_other_choices_of_the_same_prompt(store):
    store.record_completions([completion("c1", [" a", " b", " c", " d"], prompts=("p0", "p1"))])
    store.add_feedback("c1", choice_index=3)
    [record] = store.feedback_records()
    assert (record["kind"], record["prompt"], record["response"], record["rejected"]) == \
        ("preference", "p1", " d", [" c"])


def test_feedback_on_an_unknown_completion_is_404(store):
    with pytest.raises(FeedbackError) as err:
        store.add_feedback("nope", rating=3)
    assert err.value.status == 404 and "nope" in err.value.message


@pytest.mark.parametrize("kwargs, message", [
    ({"choice_index": 5, "rating": 2}, "out of range"),
    ({"choice_index": 0}, "several choices"),
])
def test_feedback_that_does_not_fit_the_completion_is_400(store, kwargs, message):
    store.record_completions([completion("c1", [" only"])])
    with pytest.raises(FeedbackError) as err:
        store.add_feedback("c1", **kwargs)
    assert err.value.status == 400 and message in err.value.message
    assert store.feedback_records() == []


def test_acknowledged_feedback_survives_a_killed_writer(tmp_path):
    """The writer prints each acknowledgement and then dies by SIGKILL, without closing anything."""
    path = tmp_path / "feedback.db"
    writer = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_serve_feedback_store import completion
        from rlhf_ray.serve.feedback_store import FeedbackStore
        store = FeedbackStore({str(path)!r})
        store.record_completions([completion(f"c{{i}}", [" x", " y"]) for i in range(5)])
        for i in range(5):
            print(store.add_feedback(f"c{{i}}", rating=i + 1)["id"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    acknowledged = [int(line) for line in result.stdout.split()]
    assert len(acknowledged) == 5
    reopened = FeedbackStore(path, readonly=True)
    assert [r["id"] for r in reopened.feedback_records()] == acknowledged
    assert [r["rating"] for r in reopened.feedback_records()] == [1, 2, 3, 4, 5]


def test_a_reader_sees_commits_while_the_writer_is_open(store):
    store.record_completions([completion("c1", [" x", " y"])])
    store.add_feedback("c1", choice_index=0)
    reader = FeedbackStore(store.path, readonly=True)
    assert len(reader.feedback_records()) == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.db.execute("DELETE FROM feedback")


def test_export_writes_pairs_ratings_and_statistics(store, tmp_path):
    store.record_completions([
        completion("c1", [" good", " bad", " dull"]),
        completion("c2", [" great", " great"]),  # identical choices: no preference to learn
        completion("c3", [" fun"], version="v4-def"),
    ])
    store.add_feedback("c1", choice_index=1)
    store.add_feedback("c1", choice_index=0)  # the user changed their mind: the latest counts
    store.add_feedback("c2", choice_index=0)
    store.add_feedback("c1", rating=5, choice_index=0)
    store.add_feedback("c1", rating=2, choice_index=2)
    store.add_feedback("c3", rating=1)
    store.add_feedback("c3", rating=4)  # re-rated: the latest counts
    summary = export_feedback(store.path, tmp_path / "out")

    pairs = [json.loads(line) for line in summary.preferences.read_text().splitlines()]
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs] == [
        {"prompt": "the movie was", "chosen": " good", "rejected": " bad"},
        {"prompt": "the movie was", "chosen": " good", "rejected": " dull"}]
    # lineage: the completion judged, its policy version and sampling, who and when
    assert {(p["source"], p["annotator"], p["completion_id"], p["policy_version"]) for p in pairs} == \
        {("api", None, "c1", "v3-abc")}
    assert pairs[0]["sampling"] == {"temperature": 1.0} and pairs[0]["created"] > 0
    assert summary.ties_skipped == 1  # c2's two identical choices
    ratings = [json.loads(line) for line in summary.ratings.read_text().splitlines()]
    assert sorted((r["response"], r["rating"]) for r in ratings) == [(" dull", 2), (" fun", 4), (" good", 5)]
    stats = json.loads(summary.stats.read_text())
    assert stats["count"] == 3 and stats["mean"] == pytest.approx(11 / 3)
    assert stats["histogram"] == {"1": 0, "2": 1, "3": 0, "4": 1, "5": 1}
    assert stats["score"] == pytest.approx((11 / 3 - 3) / 2)
    assert stats["by_policy_version"]["v4-def"]["count"] == 1
    assert stats["by_policy_version"]["v3-abc"]["mean"] == pytest.approx(3.5)


def test_feedback_export_command(store, tmp_path, capsys):
    store.record_completions([completion("c1", [" good", " bad"])])
    store.add_feedback("c1", choice_index=0)
    store.add_feedback("c1", rating=5)
    assert main(["feedback", "export", str(store.path), "--out", str(tmp_path / "out")]) == 0
    assert "1 preference pairs" in capsys.readouterr().out
    pair = json.loads((tmp_path / "out" / "preferences.jsonl").read_text())
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("the movie was", " good", " bad")


def test_export_leaves_out_empty_answers_and_says_so(store, tmp_path, capsys):
    """A policy that ends at once gives an empty answer; a person may prefer the other or rate it, but the
    stages train on text (a blank field is a data error), so the export leaves such records out and counts them."""
    store.record_completions([completion("c1", [" good", ""]), completion("c2", [" fine", " ok"])])
    store.add_feedback("c1", choice_index=0)  # " good" over "": left out
    store.add_feedback("c1", rating=1, choice_index=1)  # a rating of "": left out
    store.add_feedback("c2", choice_index=1)
    store.add_feedback("c2", rating=4, choice_index=1)
    assert main(["feedback", "export", str(store.path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "4 feedback records and 0 labels -> 1 preference pairs" in out
    assert out.splitlines()[0].endswith("left out: 1 pairs with an empty answer, 1 ratings of an empty answer")
    pairs = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    ratings = [json.loads(line) for line in (tmp_path / "out" / "ratings.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" ok", " fine")]
    assert [(r["response"], r["rating"]) for r in ratings] == [(" ok", 4)]


def test_feedback_export_of_a_missing_database_is_a_usage_error(tmp_path, capsys):
    assert main(["feedback", "export", str(tmp_path / "missing.db"), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
