"""Completions, the human feedback on them, and the labelling queues of the feedback pages, kept in SQLite.

    completions  one row per API response: id, time, model, policy version, endpoint, request parameters
    choices      its choices: prompt (the text the policy saw), response, finish reason
    feedback     a rating (1..5) or a like (thumbs up or down) of one choice, or a preference (one choice
                 over the others of its prompt), self-contained: prompt, response, rejected responses,
                 policy version and time are copied in; `annotator` names who gave it on the pages
    annotators, queues, items, labels   the people and queues of the pages (serve/annotation.py)

The database runs in WAL mode with `synchronous=FULL`: a commit is on disk when `add_feedback` returns,
which is when the server acknowledges. WAL lets `rlhf-ray feedback export` read while the server writes.
SQLite's WAL needs a local disk (https://www.sqlite.org/wal.html: not over a network filesystem), which
is why one Serve replica owns the file (see `app.FeedbackStoreServer`). A database of schema 1 (before
likes and annotators) is migrated when a writer opens it. The export is in serve/feedback_export.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ray.serve.annotation import ANNOTATION_SCHEMA, AnnotationStore
from rlhf_ray.serve.db import FeedbackError, transaction

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS choices (
    completion_id TEXT NOT NULL REFERENCES completions(id),
    idx INTEGER NOT NULL,
    prompt_index INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    PRIMARY KEY (completion_id, idx)
);
"""
FEEDBACK_TABLE = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    completion_id TEXT NOT NULL REFERENCES completions(id),
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'preference', 'like')),
    choice_index INTEGER NOT NULL,
    rating INTEGER CHECK (rating BETWEEN 1 AND 5),
    liked INTEGER CHECK (liked IN (0, 1)),
    comment TEXT,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    rejected TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    annotator TEXT
)
"""
# what the HTTP ingress may ask of the store's replica
STORE_OPS = ("add_feedback", "annotator_for_key", "queues", "next_item", "add_label", "annotators", "study_results")
V1_FEEDBACK_COLUMNS = ("id, completion_id, kind, choice_index, rating, comment, prompt, response, rejected, "
                       "policy_version, model, created")
FEEDBACK_INDEX = "CREATE INDEX IF NOT EXISTS feedback_by_completion ON feedback (completion_id);"


@dataclass
class ChoiceRecord:
    index: int
    prompt_index: int  # which prompt of the request (a completions request may send several)
    prompt: str
    response: str
    finish_reason: str


@dataclass
class CompletionRecord:
    id: str
    created: float
    model: str
    policy_version: str
    endpoint: str  # "completions" | "chat.completions"
    choices: list[ChoiceRecord]
    request: dict = field(default_factory=dict)  # sampling parameters, and the messages of a chat


class FeedbackStore(AnnotationStore):
    """The SQLite database of one server. Not thread-safe: use it from one thread at a time."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path).expanduser()
        if readonly:  # a reader next to a running server (export): never writes, not even the schema
            if not self.path.is_file():
                raise FileNotFoundError(f"feedback database {self.path} not found")
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0,
                                      isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                raise RuntimeError(f"{self.path}: written by an older rlhf-ray (schema 1); start `rlhf-ray serve "
                                   "--feedback-db` on it once to migrate it")
            if version != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: not a feedback database of schema version {SCHEMA_VERSION} "
                                   f"(user_version {version})")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local disk")
        self.db.execute("PRAGMA synchronous=FULL")  # the WAL is fsynced at every commit
        self.db.execute("PRAGMA foreign_keys=ON")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
        with transaction(self.db):
            for statement in (SCHEMA + ANNOTATION_SCHEMA).split(";"):  # executescript would commit
                if statement.strip():
                    self.db.execute(statement)
            if version == 1:  # schema 1: feedback without likes and annotators; the table is rebuilt
                self.db.execute("ALTER TABLE feedback RENAME TO feedback_v1")
                self.db.execute(FEEDBACK_TABLE)
                self.db.execute(f"INSERT INTO feedback ({V1_FEEDBACK_COLUMNS}) SELECT {V1_FEEDBACK_COLUMNS} "
                                "FROM feedback_v1")
                self.db.execute("DROP TABLE feedback_v1")
            self.db.execute(FEEDBACK_TABLE)
            self.db.execute(FEEDBACK_INDEX)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def record_completions(self, records: list[CompletionRecord]) -> None:
        """Store completions (one transaction: one fsync for a whole batch of responses)."""
        with transaction(self.db):
            self.db.executemany(
                "INSERT INTO completions (id, created, model, policy_version, endpoint, request) VALUES (?,?,?,?,?,?)",
                [(r.id, r.created, r.model, r.policy_version, r.endpoint, json.dumps(r.request)) for r in records])
            self.db.executemany(
                "INSERT INTO choices (completion_id, idx, prompt_index, prompt, response, finish_reason) "
                "VALUES (?,?,?,?,?,?)",
                [(r.id, c.index, c.prompt_index, c.prompt, c.response, c.finish_reason)
                 for r in records for c in r.choices])
            self.enqueue_served(records)  # two choices of a prompt become an item of the served queue

    def add_feedback(self, completion_id: str, rating: int | None = None, choice_index: int | None = None,
                     comment: str | None = None, like: bool | None = None, annotator: str | None = None) -> dict:
        """Store a rating (`rating` of choice `choice_index`, default 0), a like (`like`: thumbs up or down)
        or, with neither, a preference for choice `choice_index`; returns the acknowledgement once committed.
        `annotator`: who gave it on the feedback pages. Raises FeedbackError."""
        if rating is not None and like is not None:
            raise FeedbackError(400, "give a rating or a like, not both", "like")
        completion = self.db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
        if completion is None:
            raise FeedbackError(404, f"no completion with id {completion_id!r}", "completion_id")
        choices = self.db.execute("SELECT * FROM choices WHERE completion_id = ? ORDER BY idx",
                                  (completion_id,)).fetchall()
        kind = "rating" if rating is not None else "like" if like is not None else "preference"
        index = 0 if choice_index is None else choice_index
        if index >= len(choices):
            raise FeedbackError(400, f"choice_index {index} out of range: completion {completion_id} has "
                                     f"{len(choices)} choice(s)", "choice_index")
        chosen = choices[index]
        rejected = [c["response"] for c in choices
                    if c["prompt_index"] == chosen["prompt_index"] and c["idx"] != index]
        if kind == "preference" and not rejected:
            raise FeedbackError(400, f"a preference needs several choices of one prompt; completion "
                                     f"{completion_id} has one (ask with n >= 2, or send a rating)", "choice_index")
        created = time.time()
        with transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO feedback (completion_id, kind, choice_index, rating, liked, comment, prompt, response, "
                "rejected, policy_version, model, created, annotator) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (completion_id, kind, index, rating, None if like is None else int(like), comment, chosen["prompt"],
                 chosen["response"], json.dumps(rejected), completion["policy_version"], completion["model"],
                 created, annotator))
        return {"id": cursor.lastrowid, "completion_id": completion_id, "kind": kind, "created": int(created)}

    def counts(self) -> dict:
        """How many feedback records and labels (blind studies' judgements aside: they are not training data)
        the database holds, and their largest ids (one query each: `rlhf-ray loop` polls this)."""
        records, last_record = self.db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM feedback").fetchone()
        labels, last_label = self.db.execute(
            "SELECT COUNT(*), COALESCE(MAX(l.id), 0) FROM labels l JOIN items i ON i.id = l.item_id "
            "JOIN queues q ON q.name = i.queue WHERE q.source != 'study'").fetchone()
        return {"records": records, "labels": labels, "last_record_id": last_record, "last_label_id": last_label}

    def feedback_records(self) -> list[dict]:
        """Every feedback row, oldest first, `rejected` as a list."""
        rows = self.db.execute("SELECT * FROM feedback ORDER BY id").fetchall()
        return [{**dict(row), "rejected": json.loads(row["rejected"])} for row in rows]

    def completions(self) -> list[dict]:
        """Every completion's row (not its choices), `request` parsed."""
        rows = self.db.execute("SELECT * FROM completions ORDER BY created").fetchall()
        return [{**dict(row), "request": json.loads(row["request"])} for row in rows]

    def completion(self, completion_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
        if row is None:
            return None
        choices = self.db.execute("SELECT * FROM choices WHERE completion_id = ? ORDER BY idx",
                                  (completion_id,)).fetchall()
        return {**dict(row), "request": json.loads(row["request"]), "choices": [dict(c) for c in choices]}
