"""People who label, the queues they label and their labels, in the feedback database (a mixin of
`FeedbackStore`: one SQLite file, one writer).

    annotators  name, the SHA-256 of the key `rlhf-ray annotators add NAME` printed once, created
    queues      name, source (pairs | served | study), a description for the page header, labels_per_item,
                spec (for a study: its two models and its prompts)
    items       a prompt and two responses shown as A and B; meta says where they came from (the pairs file
                and id, the served completion and its choices, or which model of a study is shown first)
    labels      one annotator's judgement of one item: A, B or tie and/or a 1..5 rating of each answer,
                a comment, the time; UNIQUE(item, annotator): nobody labels an item twice

An item is offered to an annotator who has not labelled it while it has fewer than `labels_per_item`
labels, in the order items entered the queue. Labels are committed before they are acknowledged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from collections import defaultdict
from itertools import combinations

from rlhf_ray.evaluation.agreement import cohen_kappa, win_rate
from rlhf_ray.serve.db import FeedbackError, transaction

SOURCES = ("pairs", "served", "study")
SERVED_QUEUE = "served"  # completions served with n >= 2 enter this queue, two choices of a prompt per item
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KEY_PREFIX = "ann-"

ANNOTATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL CHECK (source IN ('pairs', 'served', 'study')),
    description TEXT NOT NULL,
    labels_per_item INTEGER NOT NULL CHECK (labels_per_item >= 1),
    spec TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL REFERENCES queues(name),
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_queue ON items (queue, id);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    choice TEXT CHECK (choice IN ('A', 'B', 'tie')),
    rating_a INTEGER CHECK (rating_a BETWEEN 1 AND 5),
    rating_b INTEGER CHECK (rating_b BETWEEN 1 AND 5),
    comment TEXT,
    created REAL NOT NULL,
    UNIQUE (item_id, annotator)
);
"""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise FeedbackError(400, f"{what} name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                                 "starting with a letter or digit", what)
    return name


def _error(status: int, message: str, param: str | None = None) -> FeedbackError:
    return FeedbackError(status, message, param)


class AnnotationStore:
    """Annotators, queues, items and labels; mixed into `FeedbackStore`, which owns `self.db`."""

    db: sqlite3.Connection

    # annotators

    def add_annotator(self, name: str) -> str:
        """Register `name`; returns its key, which is stored only as a hash (print it once)."""
        check_name(name, "annotator")
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        try:
            with transaction(self.db):
                self.db.execute("INSERT INTO annotators (name, key_sha256, created) VALUES (?,?,?)",
                                (name, key_digest(key), time.time()))
        except sqlite3.IntegrityError:
            raise _error(409, f"annotator {name!r} already exists", "name") from None
        return key

    def annotator_for_key(self, key: str | None) -> str:
        """The name of the annotator whose key this is; FeedbackError 401 for a missing or unknown key."""
        if not key:
            raise _error(401, "missing annotator key: enter the key `rlhf-ray annotators add NAME` printed",
                         "annotator_key")
        digest = key_digest(key)
        for row in self.db.execute("SELECT name, key_sha256 FROM annotators"):
            if hmac.compare_digest(row["key_sha256"], digest):
                return row["name"]
        raise _error(401, "unknown annotator key (ask the admin for yours: rlhf-ray annotators add NAME)",
                     "annotator_key")

    def annotators(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT a.name, a.created, COUNT(l.id) AS labels FROM annotators a LEFT JOIN labels l "
            "ON l.annotator = a.name GROUP BY a.name ORDER BY a.name").fetchall()
        return [dict(row) for row in rows]

    # queues and items

    def add_queue(self, name: str, source: str, description: str, labels_per_item: int = 1,
                  spec: dict | None = None, items: list[dict] = ()) -> dict:
        """Create queue `name` with `items` ({prompt, response_a, response_b, meta}) in one transaction."""
        check_name(name, "queue")
        if source not in SOURCES:
            raise _error(400, f"queue source {source!r} is not one of {SOURCES}", "source")
        if labels_per_item < 1:
            raise _error(400, f"labels_per_item must be >= 1, got {labels_per_item}", "labels_per_item")
        now = time.time()
        try:
            with transaction(self.db):
                self.db.execute("INSERT INTO queues (name, source, description, labels_per_item, spec, created) "
                                "VALUES (?,?,?,?,?,?)", (name, source, description, labels_per_item,
                                                         json.dumps(spec or {}), now))
                self._insert_items(name, items, now)
        except sqlite3.IntegrityError:
            raise _error(409, f"queue {name!r} already exists", "name") from None
        return self.queue(name)

    def _insert_items(self, queue: str, items, now: float) -> None:
        self.db.executemany(
            "INSERT INTO items (queue, prompt, response_a, response_b, meta, created) VALUES (?,?,?,?,?,?)",
            [(queue, i["prompt"], i["response_a"], i["response_b"], json.dumps(i.get("meta", {})), now)
             for i in items])

    def enqueue_served(self, records) -> None:
        """Items of the served queue from completions with two or more choices of one prompt (the first two
        different texts); called inside the transaction that stores the completions."""
        items = []
        for record in records:
            by_prompt = defaultdict(list)
            for choice in record.choices:
                by_prompt[choice.prompt_index].append(choice)
            for choices in by_prompt.values():
                first = choices[0]
                second = next((c for c in choices[1:] if c.response != first.response), None)
                if second is not None:
                    items.append({"prompt": first.prompt, "response_a": first.response, "response_b": second.response,
                                  "meta": {"completion_id": record.id, "choice_a": first.index,
                                           "choice_b": second.index, "policy_version": record.policy_version}})
        if not items:
            return
        now = time.time()
        self.db.execute("INSERT OR IGNORE INTO queues (name, source, description, labels_per_item, spec, created) "
                        "VALUES (?,?,?,?,?,?)", (SERVED_QUEUE, "served", "two answers of the served policy "
                                                 "(requests with n >= 2)", 1, "{}", now))
        self._insert_items(SERVED_QUEUE, items, now)

    def queue(self, name: str) -> dict:
        row = self.db.execute("SELECT * FROM queues WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r["name"] for r in self.db.execute("SELECT name FROM queues ORDER BY name")]
            raise _error(404, f"no queue {name!r} (queues: {', '.join(known) or 'none yet'})", "queue")
        return self._queue_summary(row)

    def _queue_summary(self, row) -> dict:
        counts = self.db.execute(
            "SELECT COUNT(*) AS items, COALESCE(SUM(n), 0) AS labels, COALESCE(SUM(n >= ?), 0) AS done FROM "
            "(SELECT i.id, COUNT(l.id) AS n FROM items i LEFT JOIN labels l ON l.item_id = i.id "
            "WHERE i.queue = ? GROUP BY i.id)", (row["labels_per_item"], row["name"])).fetchone()
        return {"name": row["name"], "source": row["source"], "description": row["description"],
                "labels_per_item": row["labels_per_item"], "spec": json.loads(row["spec"]),
                "created": row["created"], **dict(counts)}

    def queues(self) -> list[dict]:
        return [self._queue_summary(row) for row in self.db.execute("SELECT * FROM queues ORDER BY created, name")]

    def next_item(self, queue: str, annotator: str) -> dict:
        """The queue, the annotator's next item (None when nothing is left for them) and their progress. A
        study's item never says which model wrote which answer."""
        summary = self.queue(queue)
        row = self.db.execute(
            "SELECT i.id, i.prompt, i.response_a, i.response_b, i.meta FROM items i WHERE i.queue = ? "
            "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.annotator = ?) "
            "AND (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id) < ? ORDER BY i.id LIMIT 1",
            (queue, annotator, summary["labels_per_item"])).fetchone()
        mine = self.db.execute("SELECT COUNT(*) FROM labels l JOIN items i ON i.id = l.item_id "
                               "WHERE i.queue = ? AND l.annotator = ?", (queue, annotator)).fetchone()[0]
        item = None
        if row is not None:
            item = {"id": row["id"], "prompt": row["prompt"], "response_a": row["response_a"],
                    "response_b": row["response_b"]}
        public = {k: v for k, v in summary.items() if k != "spec"}
        return {"queue": public, "annotator": annotator, "labelled": mine, "item": item}

    def add_label(self, queue: str, item_id: int, annotator: str, choice: str | None = None,
                  rating_a: int | None = None, rating_b: int | None = None, comment: str | None = None) -> dict:
        """Store one annotator's label of one item of `queue`; the acknowledgement once committed."""
        if choice is None and rating_a is None and rating_b is None:
            raise _error(400, "a label needs a choice (A, B or tie) or a rating (1..5) of an answer", "choice")
        if choice not in (None, "A", "B", "tie"):
            raise _error(400, f"choice must be 'A', 'B' or 'tie', got {choice!r}", "choice")
        for field, rating in (("rating_a", rating_a), ("rating_b", rating_b)):
            if rating is not None and (isinstance(rating, bool) or rating not in range(1, 6)):
                raise _error(400, f"{field} must be a whole number from 1 to 5, got {rating!r}", field)
        summary = self.queue(queue)
        if summary["source"] == "study" and choice is None:
            raise _error(400, "a blind study asks which answer is better: choose A, B or tie", "choice")
        item = self.db.execute("SELECT id FROM items WHERE id = ? AND queue = ?", (item_id, queue)).fetchone()
        if item is None:
            raise _error(404, f"item {item_id} is not in queue {queue!r}", "item_id")
        created = time.time()
        with transaction(self.db):
            if self.db.execute("SELECT 1 FROM labels WHERE item_id = ? AND annotator = ?",
                               (item_id, annotator)).fetchone():
                raise _error(409, f"item {item_id} is already labelled by {annotator}; nothing was stored twice",
                             "item_id")
            count = self.db.execute("SELECT COUNT(*) FROM labels WHERE item_id = ?", (item_id,)).fetchone()[0]
            if count >= summary["labels_per_item"]:
                raise _error(409, f"item {item_id} already has its {summary['labels_per_item']} label(s)", "item_id")
            cursor = self.db.execute(
                "INSERT INTO labels (item_id, annotator, choice, rating_a, rating_b, comment, created) "
                "VALUES (?,?,?,?,?,?,?)", (item_id, annotator, choice, rating_a, rating_b, comment, created))
        return {"id": cursor.lastrowid, "object": "label", "queue": queue, "item_id": item_id,
                "annotator": annotator, "created": int(created)}

    def label_records(self, queue: str | None = None) -> list[dict]:
        """Every label joined with its item and queue, oldest first."""
        where, args = ("WHERE i.queue = ?", (queue,)) if queue is not None else ("", ())
        rows = self.db.execute(
            "SELECT l.*, i.queue, i.prompt, i.response_a, i.response_b, i.meta, q.source FROM labels l "
            f"JOIN items i ON i.id = l.item_id JOIN queues q ON q.name = i.queue {where} ORDER BY l.id",
            args).fetchall()
        return [{**dict(row), "meta": json.loads(row["meta"])} for row in rows]

    # studies

    def study_results(self, name: str) -> dict:
        """A blind study's outcome for its model `a`: win rate (ties 1/2) with its 95 % Wilson interval,
        each annotator's counts, and Cohen's kappa for each pair of annotators on the items both labelled."""
        summary = self.queue(name)
        if summary["source"] != "study":
            raise _error(400, f"queue {name!r} is a {summary['source']} queue, not a study", "queue")
        outcomes = {}  # (annotator, item) -> win | loss | tie, for model a
        for label in self.label_records(name):
            outcomes[label["annotator"], label["item_id"]] = study_outcome(label["choice"], label["meta"]["first"])
        per_annotator = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
        for (annotator, _), outcome in outcomes.items():
            per_annotator[annotator][outcome] += 1
        agreement = []
        for first, second in combinations(sorted(per_annotator), 2):
            shared = sorted(item for (who, item) in outcomes if who == first and (second, item) in outcomes)
            if shared:
                kappa = cohen_kappa([outcomes[first, i] for i in shared], [outcomes[second, i] for i in shared])
                agreement.append({"annotators": [first, second], "items": len(shared), "kappa": kappa,
                                  "agreed": sum(outcomes[first, i] == outcomes[second, i] for i in shared)})
        result = {"study": name, "models": summary["spec"].get("models", {}), "items": summary["items"],
                  "labels": len(outcomes), "complete": summary["done"] == summary["items"],
                  "per_annotator": dict(sorted(per_annotator.items())), "agreement": agreement, "win_rate": None}
        if outcomes:
            rate = win_rate(list(outcomes.values()))
            result["win_rate"] = {"rate": rate.rate, "low": rate.low, "high": rate.high, "wins": rate.wins,
                                  "losses": rate.losses, "ties": rate.ties}
        return result


def study_outcome(choice: str, first: str) -> str:
    """The outcome for model a of a choice between answers A and B, when model `first` ("a" or "b") was
    shown as A."""
    if choice == "tie":
        return "tie"
    return "win" if (choice == "A") == (first == "a") else "loss"
