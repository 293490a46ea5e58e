"""Completions and the human feedback on them, kept in SQLite, and their export for reward-model training.

    completions  one row per API response: id, time, model, policy version, endpoint, request parameters
    choices      its choices: prompt (the text the policy saw), response, finish reason
    feedback     a rating (1..5) of one choice, or a preference (one choice over the others of its prompt),
                 self-contained: prompt, response, rejected responses, policy version and time are copied in

The database runs in WAL mode with `synchronous=FULL`: a commit is on disk when `add_feedback` returns,
which is when the server acknowledges. WAL lets `rlhf-ray feedback export` read while the server writes.
SQLite's WAL needs a local disk (https://www.sqlite.org/wal.html: not over a network filesystem), which
is why one Serve replica owns the file (see `app.FeedbackStoreServer`).

Export (`export_feedback`): the latest preference per completion becomes one (prompt, chosen, rejected)
line per rejected choice, the reward-model dataset; the latest rating per choice goes to ratings.jsonl
and its statistics (overall and per policy version) to rating_stats.json.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    completion_id TEXT NOT NULL REFERENCES completions(id),
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'preference')),
    choice_index INTEGER NOT NULL,
    rating INTEGER CHECK (rating BETWEEN 1 AND 5),
    comment TEXT,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    rejected TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_completion ON feedback (completion_id);
"""


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


class FeedbackError(Exception):
    """Feedback that cannot be stored; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class FeedbackStore:
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
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def record_completions(self, records: list[CompletionRecord]) -> None:
        """Store completions (one transaction: one fsync for a whole batch of responses)."""
        with _transaction(self.db):
            self.db.executemany(
                "INSERT INTO completions (id, created, model, policy_version, endpoint, request) VALUES (?,?,?,?,?,?)",
                [(r.id, r.created, r.model, r.policy_version, r.endpoint, json.dumps(r.request)) for r in records])
            self.db.executemany(
                "INSERT INTO choices (completion_id, idx, prompt_index, prompt, response, finish_reason) "
                "VALUES (?,?,?,?,?,?)",
                [(r.id, c.index, c.prompt_index, c.prompt, c.response, c.finish_reason)
                 for r in records for c in r.choices])

    def add_feedback(self, completion_id: str, rating: int | None = None, choice_index: int | None = None,
                     comment: str | None = None) -> dict:
        """Store a rating (`rating` of choice `choice_index`, default 0) or, without a rating, a preference
        for choice `choice_index`; returns the acknowledgement once committed. Raises FeedbackError."""
        completion = self.db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
        if completion is None:
            raise FeedbackError(404, f"no completion with id {completion_id!r}", "completion_id")
        choices = self.db.execute("SELECT * FROM choices WHERE completion_id = ? ORDER BY idx",
                                  (completion_id,)).fetchall()
        kind = "rating" if rating is not None else "preference"
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
        with _transaction(self.db):
            cursor = self.db.execute(
                "INSERT INTO feedback (completion_id, kind, choice_index, rating, comment, prompt, response, "
                "rejected, policy_version, model, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (completion_id, kind, index, rating, comment, chosen["prompt"], chosen["response"],
                 json.dumps(rejected), completion["policy_version"], completion["model"], created))
        return {"id": cursor.lastrowid, "completion_id": completion_id, "kind": kind, "created": int(created)}

    def feedback_records(self) -> list[dict]:
        """Every feedback row, oldest first, `rejected` as a list."""
        rows = self.db.execute("SELECT * FROM feedback ORDER BY id").fetchall()
        return [{**dict(row), "rejected": json.loads(row["rejected"])} for row in rows]

    def completion(self, completion_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
        if row is None:
            return None
        choices = self.db.execute("SELECT * FROM choices WHERE completion_id = ? ORDER BY idx",
                                  (completion_id,)).fetchall()
        return {**dict(row), "request": json.loads(row["request"]), "choices": [dict(c) for c in choices]}


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


# Export


def latest(records: list[dict], key) -> list[dict]:
    """The last record of each key, in the order of those last records (later feedback supersedes)."""
    by_key = {}
    for record in records:
        by_key.pop(key(record), None)
        by_key[key(record)] = record
    return list(by_key.values())


def preference_pairs(records: list[dict]) -> tuple[list[dict], int]:
    """One {prompt, chosen, rejected} per rejected choice of the latest preference of each completion, and
    how many pairs of identical texts (ties: no preference) were left out."""
    preferences = latest([r for r in records if r["kind"] == "preference"], key=lambda r: r["completion_id"])
    candidates = [(r, rejected) for r in preferences for rejected in r["rejected"]]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": rejected}
             for r, rejected in candidates if rejected != r["response"]]
    return pairs, len(candidates) - len(pairs)


def ratings(records: list[dict]) -> list[dict]:
    """The latest rating of each choice."""
    rated = latest([r for r in records if r["kind"] == "rating"],
                   key=lambda r: (r["completion_id"], r["choice_index"]))
    return [{"prompt": r["prompt"], "response": r["response"], "rating": r["rating"], "comment": r["comment"],
             "policy_version": r["policy_version"], "completion_id": r["completion_id"], "created": r["created"]}
            for r in rated]


def rating_summary(values: list[int]) -> dict:
    """count, mean, std, the 1..5 histogram, and the mean mapped to [-1, 1] ((mean - 3) / 2) as a score."""
    count = len(values)
    mean = sum(values) / count if count else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / count) if count else None
    histogram = Counter(values)
    return {"count": count, "mean": mean, "std": std,
            "histogram": {str(k): histogram.get(k, 0) for k in range(1, 6)},
            "score": (mean - 3) / 2 if count else None}


def rating_stats(rated: list[dict]) -> dict:
    by_version = defaultdict(list)
    for r in rated:
        by_version[r["policy_version"]].append(r["rating"])
    return {**rating_summary([r["rating"] for r in rated]),
            "by_policy_version": {v: rating_summary(values) for v, values in sorted(by_version.items())}}


@dataclass
class ExportSummary:
    preferences: Path
    ratings: Path
    stats: Path
    pairs: int
    rated: int
    feedback_records: int
    ties_skipped: int = 0  # pairs of identical texts, left out of preferences.jsonl

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def export_feedback(db_path: str | os.PathLike, out_dir: str | os.PathLike) -> ExportSummary:
    """Write preferences.jsonl, ratings.jsonl and rating_stats.json of the database into `out_dir`."""
    db_path, out_dir = Path(db_path), Path(out_dir)
    store = FeedbackStore(db_path, readonly=True)
    try:
        records = store.feedback_records()
    finally:
        store.close()
    (pairs, ties), rated = preference_pairs(records), ratings(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(out_dir / "preferences.jsonl", out_dir / "ratings.jsonl", out_dir / "rating_stats.json",
                            pairs=len(pairs), rated=len(rated), feedback_records=len(records),
                            ties_skipped=ties)
    _write_atomically(summary.preferences, _jsonl(pairs))
    _write_atomically(summary.ratings, _jsonl(rated))
    _write_atomically(summary.stats, json.dumps(rating_stats(rated), indent=2) + "\n")
    return summary
