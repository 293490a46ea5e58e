"""The export of a feedback database (`rlhf-ray feedback export`): what people gave, as training data, with
where each record came from.

    preferences.jsonl   {prompt, chosen, rejected} for the reward model and DPO: the latest preference per
                        completion and person from the API, and every A/B label of the labelling pages
                        (ties, and pairs with an empty answer, are left out and counted)
    ratings.jsonl       {prompt, response, rating 1..5 | like true/false} for the satisfaction model: the
                        latest rating and like per answer and person, and the pages' ratings of A and B
    rating_stats.json   the 1..5 ratings' statistics, overall and per policy version, and the likes
    studies.json        each blind study's result (win rate with its interval, per annotator, kappa)
    study_labels.jsonl  every study judgement: item, annotator, choice, which model was shown as A, outcome

Every training record carries its lineage: `source` ("api", "chat" or "queue:NAME"), `annotator` (None
for an API client), `created`, and for served answers `completion_id`, `policy_version` and `sampling`
(the request's parameters), or for a pairs file its `pair_id`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_ray.serve.db import jsonl, write_atomically
from rlhf_ray.serve.annotation import study_outcome
from rlhf_ray.serve.feedback_store import FeedbackStore


def latest(records: list[dict], key) -> list[dict]:
    """The last record of each key, in the order of those last records (later feedback supersedes)."""
    by_key = {}
    for record in records:
        by_key.pop(key(record), None)
        by_key[key(record)] = record
    return list(by_key.values())


def _lineage(record: dict, completions: dict) -> dict:
    """Where a piece of feedback on a served completion came from: who, when, which policy, which sampling."""
    completion = completions.get(record["completion_id"], {})
    request = completion.get("request", {})
    source = "chat" if record.get("annotator") else "api"
    return {"source": source, "annotator": record.get("annotator"), "created": record["created"],
            "completion_id": record["completion_id"], "policy_version": record["policy_version"],
            "model": record["model"], "sampling": {k: v for k, v in request.items() if k != "messages"}}


def _label_lineage(label: dict, completions: dict) -> dict:
    meta = label["meta"]
    lineage = {"source": f"queue:{label['queue']}", "annotator": label["annotator"], "created": label["created"],
               "item_id": label["item_id"]}
    if "completion_id" in meta:  # an item of the served queue
        completion = completions.get(meta["completion_id"], {})
        lineage.update(completion_id=meta["completion_id"], policy_version=meta.get("policy_version"),
                       model=completion.get("model"),
                       sampling={k: v for k, v in completion.get("request", {}).items() if k != "messages"})
    elif "pair_id" in meta:  # an item of a pairs file of `rlhf-ray label`
        lineage.update(pair_id=meta["pair_id"], pairs_file=meta.get("pairs_file"))
    return lineage


def preference_pairs(records: list[dict], labels: list[dict] = (), completions: dict | None = None
                     ) -> tuple[list[dict], int]:
    """One {prompt, chosen, rejected, lineage...} per rejected choice of the latest preference of each
    completion (and person), and per A/B label of a labelling queue; and how many ties (identical texts,
    or a "tie" label) were left out."""
    completions = completions or {}
    preferences = latest([r for r in records if r["kind"] == "preference"],
                         key=lambda r: (r["completion_id"], r.get("annotator")))
    candidates = [(r, rejected) for r in preferences for rejected in r["rejected"]]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": rejected, **_lineage(r, completions)}
             for r, rejected in candidates if rejected != r["response"]]
    ties = len(candidates) - len(pairs)
    for label in labels:
        if label["source"] == "study" or label["choice"] is None:
            continue
        if label["choice"] == "tie":
            ties += 1
            continue
        chosen, rejected = ((label["response_a"], label["response_b"]) if label["choice"] == "A"
                            else (label["response_b"], label["response_a"]))
        pairs.append({"prompt": label["prompt"], "chosen": chosen, "rejected": rejected,
                      **_label_lineage(label, completions)})
    return pairs, ties


def ratings(records: list[dict], labels: list[dict] = (), completions: dict | None = None) -> list[dict]:
    """The latest rating and the latest like of each answer by each person, and the pages' ratings."""
    completions = completions or {}
    rated = latest([r for r in records if r["kind"] in ("rating", "like")],
                   key=lambda r: (r["completion_id"], r["choice_index"], r.get("annotator"), r["kind"]))
    rows = []
    for r in rated:
        value = {"rating": r["rating"]} if r["kind"] == "rating" else {"like": bool(r["liked"])}
        rows.append({"prompt": r["prompt"], "response": r["response"], **value, "comment": r["comment"],
                     **_lineage(r, completions)})
    for label in labels:
        for answer in ("a", "b"):
            if label[f"rating_{answer}"] is not None:
                rows.append({"prompt": label["prompt"], "response": label[f"response_{answer}"],
                             "rating": label[f"rating_{answer}"], "comment": label["comment"],
                             "answer": answer.upper(), **_label_lineage(label, completions)})
    return rows


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
    numeric = [r for r in rated if r.get("rating") is not None]
    likes = [r["like"] for r in rated if r.get("like") is not None]
    by_version = defaultdict(list)
    for r in numeric:
        by_version[r.get("policy_version")].append(r["rating"])
    return {**rating_summary([r["rating"] for r in numeric]),
            "by_policy_version": {str(v): rating_summary(values)
                                  for v, values in sorted(by_version.items(), key=lambda kv: str(kv[0]))},
            "likes": {"up": sum(likes), "down": len(likes) - sum(likes)}}


def study_labels(labels: list[dict]) -> list[dict]:
    return [{"study": label["queue"], "item_id": label["item_id"], "annotator": label["annotator"],
             "choice": label["choice"], "shown_as_a": label["meta"]["first"],
             "outcome": study_outcome(label["choice"], label["meta"]["first"]), "created": label["created"],
             "comment": label["comment"], "prompt": label["prompt"], "response_a": label["response_a"],
             "response_b": label["response_b"]}
            for label in labels if label["source"] == "study"]


@dataclass
class ExportSummary:
    preferences: Path
    ratings: Path
    stats: Path
    studies: Path
    study_labels: Path
    pairs: int
    rated: int
    feedback_records: int
    labels: int = 0  # judgements given on the labelling and evaluation pages
    ties_skipped: int = 0  # pairs of identical texts and "tie" labels, left out of preferences.jsonl
    # pairs and ratings of an empty answer (the policy ended at once), left out: the stages' data need text
    empty_pairs: int = 0
    empty_ratings: int = 0

    def left_out(self, of: str = "all") -> str:
        """What the export left out of the pairs, the ratings or "all", for one line ('' when nothing)."""
        counts = {"ties": self.ties_skipped if of != "ratings" else 0,
                  "pairs with an empty answer": self.empty_pairs if of != "ratings" else 0,
                  "ratings of an empty answer": self.empty_ratings if of != "pairs" else 0}
        parts = [f"{count} {what}" for what, count in counts.items() if count]
        return f"; left out: {', '.join(parts)}" if parts else ""

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def export_feedback(db_path: str | os.PathLike, out_dir: str | os.PathLike) -> ExportSummary:
    """Write the files listed in this module's docstring into `out_dir`, each whole or not at all."""
    db_path, out_dir = Path(db_path), Path(out_dir)
    store = FeedbackStore(db_path, readonly=True)
    try:
        records, labels = store.feedback_records(), store.label_records()
        completions = {c["id"]: c for c in store.completions()}
        studies = {q["name"]: store.study_results(q["name"]) for q in store.queues() if q["source"] == "study"}
    finally:
        store.close()
    (pairs, ties), rated = preference_pairs(records, labels, completions), ratings(records, labels, completions)
    texts = len(pairs), len(rated)
    pairs = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()]
    rated = [r for r in rated if r["response"].strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(out_dir / "preferences.jsonl", out_dir / "ratings.jsonl", out_dir / "rating_stats.json",
                            out_dir / "studies.json", out_dir / "study_labels.jsonl", pairs=len(pairs),
                            rated=len(rated), feedback_records=len(records), labels=len(labels), ties_skipped=ties,
                            empty_pairs=texts[0] - len(pairs), empty_ratings=texts[1] - len(rated))
    write_atomically(summary.preferences, jsonl(pairs))
    write_atomically(summary.ratings, jsonl(rated))
    write_atomically(summary.stats, json.dumps(rating_stats(rated), indent=2) + "\n")
    write_atomically(summary.studies, json.dumps(studies, indent=2) + "\n")
    write_atomically(summary.study_labels, jsonl(study_labels(labels)))
    return summary
