"""The feedback pages' store and routes in-process (a FeedbackStore, FastAPI's TestClient over a
LocalBackend): annotator keys, queues from a pairs file, from served completions with n >= 2 and from a
study, labels committed once, the blind study's statistics against numbers worked out by hand, likes, the
export's lineage, and the schema-1 migration. The real browser on a real server is tests/test_browser.py."""

import json
import sqlite3

import pytest
import torch
from fastapi.testclient import TestClient

from rlhf_ray.cli import main
from rlhf_ray.models import build_tiny_model
from rlhf_ray.serve.api import LocalBackend, build_api
from rlhf_ray.serve.config import ServeConfig
from rlhf_ray.serve.db import FeedbackError
from rlhf_ray.serve.engine import GenerationEngine
from rlhf_ray.serve.feedback_export import export_feedback
from rlhf_ray.serve.feedback_store import ChoiceRecord, CompletionRecord, FeedbackStore

KEY = "api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

# The scripted study of tests/test_browser.py too: each person's outcome for model a on items 0..19.
ALICE = ["win"] * 12 + ["loss"] * 4 + ["tie"] * 4
BOB = ["win"] * 10 + ["loss"] * 6 + ["tie"] * 2 + ["win"] * 2
# By hand: 24 wins, 10 losses, 6 ties of 40 judgements -> (24 + 6/2) / 40 = 0.675. Wilson, z = 1.96:
# centre (0.675 + z^2/80) / (1 + z^2/40) = 0.65967, half-width z/(1 + z^2/40) * sqrt(0.675*0.325/40 + z^2/6400)
# = 0.13949 -> [0.52018, 0.79916]. Kappa: they agree on items 0-9, 12-17 (16 of 20: p_o = 0.8); alice's
# marginals W/L/T 12/4/4, bob's 12/6/2 -> p_e = (144 + 24 + 8)/400 = 0.44; kappa = 0.36/0.56 = 9/14.
EXPECTED = {"rate": 0.675, "low": 0.52018, "high": 0.79916, "wins": 24, "losses": 10, "ties": 6, "kappa": 9 / 14}


def choice_for(outcome: str, first: str) -> str:
    """The button a person presses for `outcome` (of model a) when model `first` is shown as A."""
    if outcome == "tie":
        return "tie"
    return "A" if (outcome == "win") == (first == "a") else "B"


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    yield store
    store.close()


def study(store, items=20, labels_per_item=2):
    from rlhf_ray.evaluation.study import study_items

    prompts = [f"question {i}" for i in range(items)]
    return store.add_queue("blind", "study", "test", labels_per_item, {"models": {"a": "new", "b": "old"}},
                           study_items(prompts, [f"alpha {i}" for i in range(items)],
                                       [f"beta {i}" for i in range(items)], seed=3))


def judge_by_script(store) -> None:
    """Alice and Bob judge every item of study "blind" as their scripts say (the side each outcome favours)."""
    for name, outcomes in (("alice", ALICE), ("bob", BOB)):
        store.add_annotator(name)
        for outcome in outcomes:
            item = store.next_item("blind", name)["item"]
            first = "a" if item["response_a"].startswith("alpha") else "b"
            store.add_label("blind", item["id"], name, choice=choice_for(outcome, first))  # 409 if shown twice


def test_study_results_match_the_hand_worked_numbers(store):
    study(store)
    judge_by_script(store)
    assert store.next_item("blind", "alice")["item"] is None and store.next_item("blind", "bob")["item"] is None
    results = store.study_results("blind")
    rate = results["win_rate"]
    assert rate["rate"] == pytest.approx(EXPECTED["rate"])
    assert (rate["low"], rate["high"]) == pytest.approx((EXPECTED["low"], EXPECTED["high"]), abs=1e-4)
    assert (rate["wins"], rate["losses"], rate["ties"]) == (24, 10, 6)
    assert results["per_annotator"] == {"alice": {"win": 12, "loss": 4, "tie": 4},
                                        "bob": {"win": 12, "loss": 6, "tie": 2}}
    [pair] = results["agreement"]
    assert pair["items"] == 20 and pair["agreed"] == 16 and pair["kappa"] == pytest.approx(EXPECTED["kappa"])
    assert results["complete"] and results["models"] == {"a": "new", "b": "old"}


def test_the_order_is_drawn_per_item_and_recorded(store):
    queue = study(store)
    items = store.label_records("blind")  # no labels yet
    assert items == [] and queue["items"] == 20
    firsts = [json.loads(row["meta"])["first"] for row in store.db.execute("SELECT meta FROM items")]
    assert set(firsts) == {"a", "b"}  # both orders occur (seed 3)
    # the page never learns the order
    store.add_annotator("alice")
    assert "meta" not in store.next_item("blind", "alice")["item"]


def test_labels_are_stored_once_and_checked(store):
    study(store, items=2, labels_per_item=1)
    store.add_annotator("alice")
    store.add_annotator("bob")
    item = store.next_item("blind", "alice")["item"]
    store.add_label("blind", item["id"], "alice", choice="A")
    cases = [  # (call, status, words of the message)
        (dict(queue="blind", item_id=item["id"], annotator="alice", choice="B"), 409, "already labelled by alice"),
        (dict(queue="blind", item_id=item["id"], annotator="bob", choice="B"), 409, "already has its 1 label"),
        (dict(queue="blind", item_id=999, annotator="bob", choice="A"), 404, "not in queue 'blind'"),
        (dict(queue="nope", item_id=item["id"], annotator="bob", choice="A"), 404, "no queue 'nope'"),
        (dict(queue="blind", item_id=item["id"] + 1, annotator="bob", rating_a=4), 400, "choose A, B or tie"),
        (dict(queue="blind", item_id=item["id"] + 1, annotator="bob", choice="C"), 400, "'A', 'B' or 'tie'"),
    ]
    for kwargs, status, words in cases:
        with pytest.raises(FeedbackError) as err:
            store.add_label(**kwargs)
        assert err.value.status == status and words in err.value.message, kwargs
    assert len(store.label_records()) == 1


def test_annotator_keys(store):
    key = store.add_annotator("alice")
    assert store.annotator_for_key(key) == "alice"
    assert key not in json.dumps([dict(r) for r in store.db.execute("SELECT * FROM annotators")])  # only a hash
    for bad, words in ((None, "missing annotator key"), ("ann-wrong", "unknown annotator key")):
        with pytest.raises(FeedbackError) as err:
            store.annotator_for_key(bad)
        assert err.value.status == 401 and words in err.value.message
    for name in ("", "a b", "x" * 65, "-dash"):
        with pytest.raises(FeedbackError):
            store.add_annotator(name)


def completion(id, responses, version="v7"):
    return CompletionRecord(id, 1.0, "tiny", version, "chat.completions",
                            [ChoiceRecord(i, 0, "hi", r, "stop") for i, r in enumerate(responses)],
                            {"temperature": 0.7, "n": len(responses), "messages": [{"role": "user", "content": "hi"}]})


def test_served_choices_queue_and_export_lineage(store, tmp_path):
    store.record_completions([completion("c1", [" yes", " no"]), completion("c2", [" same", " same"]),
                              completion("c3", [" one"])])
    served = store.queue("served")
    assert served["items"] == 1  # c2's two choices are the same text, c3 has one
    store.add_annotator("alice")
    item = store.next_item("served", "alice")["item"]
    store.add_label("served", item["id"], "alice", choice="B", rating_a=2, comment="no is right")
    store.add_feedback("c3", like=True, annotator="alice")
    store.add_feedback("c3", rating=4, annotator="alice")
    summary = export_feedback(store.path, tmp_path / "out")
    [pair] = [json.loads(line) for line in summary.preferences.read_text().splitlines()]
    assert (pair["chosen"], pair["rejected"]) == (" no", " yes")
    assert pair["source"] == "queue:served" and pair["annotator"] == "alice" and pair["completion_id"] == "c1"
    assert pair["policy_version"] == "v7" and pair["sampling"] == {"temperature": 0.7, "n": 2}
    ratings = sorted((json.loads(line) for line in summary.ratings.read_text().splitlines()),
                     key=lambda r: r["response"])
    assert [(r["response"], r.get("rating"), r.get("like"), r["source"], r["annotator"]) for r in ratings] == [
        (" one", None, True, "chat", "alice"), (" one", 4, None, "chat", "alice"),
        (" yes", 2, None, "queue:served", "alice")]
    assert json.loads(summary.stats.read_text())["likes"] == {"up": 1, "down": 0}
    # the satisfaction model's loader reads the exported ratings and likes
    from rlhf_ray.data import load_ratings
    assert sorted(r.satisfaction for r in load_ratings(summary.ratings)) == [0.25, 0.75, 1.0]


def test_a_schema_1_database_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE completions (id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT NOT NULL,
            policy_version TEXT NOT NULL, endpoint TEXT NOT NULL, request TEXT NOT NULL);
        CREATE TABLE choices (completion_id TEXT NOT NULL, idx INTEGER NOT NULL, prompt_index INTEGER NOT NULL,
            prompt TEXT NOT NULL, response TEXT NOT NULL, finish_reason TEXT NOT NULL, PRIMARY KEY (completion_id, idx));
        CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, completion_id TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('rating', 'preference')), choice_index INTEGER NOT NULL,
            rating INTEGER CHECK (rating BETWEEN 1 AND 5), comment TEXT, prompt TEXT NOT NULL, response TEXT NOT NULL,
            rejected TEXT NOT NULL, policy_version TEXT NOT NULL, model TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO completions VALUES ('c1', 1.0, 'tiny', 'v1', 'completions', '{}');
        INSERT INTO choices VALUES ('c1', 0, 0, 'p', ' r', 'stop');
        INSERT INTO feedback (completion_id, kind, choice_index, rating, prompt, response, rejected, policy_version,
            model, created) VALUES ('c1', 'rating', 0, 5, 'p', ' r', '[]', 'v1', 'tiny', 2.0);
        PRAGMA user_version = 1;""")
    db.close()
    with pytest.raises(RuntimeError, match="start `rlhf-ray serve --feedback-db` on it once"):
        FeedbackStore(path, readonly=True)
    store = FeedbackStore(path)
    [old] = store.feedback_records()
    assert (old["rating"], old["annotator"], old["liked"]) == (5, None, None)
    store.add_feedback("c1", like=False, annotator="x")  # the new kind is accepted
    store.close()
    assert [r["kind"] for r in FeedbackStore(path, readonly=True).feedback_records()] == ["rating", "like"]


@pytest.fixture
def client(tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_model("gpt2", seed=1)
    store = FeedbackStore(tmp_path / "feedback.db")
    backend = LocalBackend(GenerationEngine(model, tokenizer), store, "tiny", "v1-test")
    with TestClient(build_api(backend, ServeConfig(api_key=KEY)), raise_server_exceptions=False) as client:
        client.store = store
        yield client
    store.close()


def test_page_routes_take_annotator_keys_not_the_api_key(client):
    key = client.store.add_annotator("alice")
    study(client.store, items=3)
    for page in ("/ui/label", "/ui/chat", "/ui/eval", "/ui/admin", "/ui/static/ui.js"):
        assert client.get(page).status_code == 200, page  # the pages ask for the key themselves
    me = client.get("/ui/api/me", headers={"X-Annotator-Key": key}).json()
    assert me["annotator"] == "alice" and [q["name"] for q in me["queues"]] == ["blind"]
    assert "spec" not in me["queues"][0]  # the models of a study are not told to annotators
    assert client.get("/ui/api/me").status_code == 401
    assert client.get("/ui/api/me", headers={"X-Annotator-Key": "ann-nope"}).json()["error"]["message"] \
        .startswith("unknown annotator key")
    assert client.get("/ui/api/admin").status_code == 401  # the admin view wants the API key
    admin = client.get("/ui/api/admin", headers=AUTH).json()
    assert admin["studies"]["blind"]["items"] == 3 and admin["annotators"][0]["name"] == "alice"


def test_page_chat_and_feedback_record_the_annotator(client):
    key = client.store.add_annotator("alice")
    headers = {"X-Annotator-Key": key}
    answer = client.post("/ui/api/chat", headers=headers,
                         json={"messages": [{"role": "user", "content": "the movie was"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    completion_id = answer.json()["id"]
    assert client.store.completion(completion_id)["request"]["user"] == "annotator:alice"
    ack = client.post("/ui/api/feedback", headers=headers, json={"completion_id": completion_id, "like": True})
    assert ack.status_code == 200 and ack.json()["kind"] == "like"
    bad = [({"completion_id": completion_id, "rating": 6}, 400, "rating"),
           ({"completion_id": completion_id, "rating": 3, "like": True}, 400, "not both"),
           ({"completion_id": "nope", "like": False}, 404, "no completion")]
    for body, status, words in bad:
        response = client.post("/ui/api/feedback", headers=headers, json=body)
        assert response.status_code == status and words in response.json()["error"]["message"], body
    [row] = client.store.feedback_records()
    assert (row["kind"], row["liked"], row["annotator"]) == ("like", 1, "alice")


def test_study_commands(tmp_path, capsys):
    db, prompts = tmp_path / "f.db", tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    assert main(["study", "create", "s1", "--a", str(answers), "--b", "rlhf-ray/tiny-gpt2", "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--db", str(db)]) == 0
    assert "study s1: 4 items" in capsys.readouterr().out
    assert main(["study", "create", "s1", "--a", str(answers), "--b", str(answers), "--prompts", str(prompts),
                 "--db", str(db)]) == 1
    assert "queue 's1' already exists" in capsys.readouterr().err
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "q0", "response": "x"}) + "\n")
    assert main(["study", "create", "s2", "--a", str(short), "--b", str(answers), "--prompts", str(prompts),
                 "--db", str(db)]) == 1
    assert "no answer to 3 of the study's 4 prompts" in capsys.readouterr().err
    assert main(["study", "results", "s1", "--db", str(db)]) == 0
    assert "0 judgements of 4 items" in capsys.readouterr().out


def test_eval_puts_the_human_win_rate_beside_the_automatic_measures(tmp_path, capsys):
    from pathlib import Path

    from rlhf_ray.models import save_tiny_model

    store = FeedbackStore(tmp_path / "f.db")
    study(store)
    judge_by_script(store)
    store.close()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n{"prompt": "my day was"}\n')
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    policy, out = save_tiny_model(tmp_path / "policy", seed=2), tmp_path / "eval"
    base = ["eval", str(policy), "--config", str(quickstart), "--prompts", str(prompts), "--out", str(out)]
    assert main(base + ["--study", str(tmp_path / "f.db"), "nope"]) == 1
    assert "--study" in capsys.readouterr().err and not out.exists()  # before any model loads
    assert main(base + ["--study", str(tmp_path / "f.db"), "blind"]) == 0
    assert "win rate of a: 0.675 (95% Wilson interval 0.520-0.799)" in capsys.readouterr().out
    human = json.loads((out / "eval.json").read_text())["human"]
    assert human["win_rate"]["rate"] == pytest.approx(0.675) and human["agreement"][0]["kappa"] == pytest.approx(9 / 14)
    page = (out / "report.html").read_text()
    assert "Human evaluation" in page and "67.5%" in page and "0.643" in page


def test_the_reward_and_satisfaction_stages_train_on_what_people_gave(store, tmp_path):
    """`reward_model.feedback_db` and `satisfaction_model.feedback_db`: the pages' A/B labels become H's pairs,
    their ratings and the chat's likes S's targets (exported as `rlhf-ray feedback export` writes them)."""
    from rlhf_ray.config import RunConfig
    from rlhf_ray.pipeline.stages import export_stage_feedback

    store.record_completions([completion("c1", [" good", " bad"]), completion("c2", [" fine"])])
    store.add_annotator("alice")
    item = store.next_item("served", "alice")["item"]
    store.add_label("served", item["id"], "alice", choice="A", rating_b=1)
    store.add_feedback("c2", like=False, annotator="alice")
    config = RunConfig.model_validate({"name": "fb", "output_dir": str(tmp_path), **{
        stage: {"base": "rlhf-ray/tiny-gpt2", "feedback_db": str(store.path)}
        for stage in ("reward_model", "satisfaction_model")}})
    h = export_stage_feedback(config, "reward_model").reward_model
    assert [(r.chosen, r.rejected) for r in h.data.load_preferences()] == [(" good", " bad")]
    s = export_stage_feedback(config, "satisfaction_model").satisfaction_model
    assert sorted((r.response, r.satisfaction) for r in s.data.load_ratings()) == [(" bad", 0.0), (" fine", 0.0)]
