"""The submission CSV from test probabilities, its check against the sample submission, local scoring where the
answers are known, and the history of every submission."""

from __future__ import annotations

import csv
import hashlib
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .config import Competition
from .errors import EnsError

HISTORY_COLUMNS = ["time", "ensemble", "members", "keys", "metric", "valid_score", "file", "sha256",
                   "destination", "ref", "status", "score", "message"]


class SubmissionError(EnsError):
    """A CSV that would be rejected (or silently mis-scored) by the competition."""


def _read(path: Path, what: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return rows if reader.fieldnames else []
    except FileNotFoundError:
        raise EnsError(f"{path}: the {what} is missing") from None


def _columns(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def submission_values(comp: Competition, test_probs: np.ndarray, vocab: list[str]) -> list[str]:
    """What the target column holds for each test image: the predicted label, or the probability of the
    competition's positive class."""
    if comp.submission_kind == "probability":
        if comp.positive_class not in vocab:
            raise EnsError(f"competitions/{comp.name}.yaml: positive_class '{comp.positive_class}' is not one of the "
                           f"classes {vocab}; fix positive_class")
        return [f"{p:.6f}" for p in test_probs[:, vocab.index(comp.positive_class)]]
    return list(np.asarray(vocab)[test_probs.argmax(1)])


def write_submission(path: Path, comp: Competition, sample_path: Path, test_ids: list[str],
                     test_probs: np.ndarray, vocab: list[str]) -> Path:
    """The submission in the sample submission's row order and columns."""
    index = {image_id: i for i, image_id in enumerate(test_ids)}
    sample = _read(sample_path, "sample submission")
    missing = next((r[comp.id_column] for r in sample if r[comp.id_column] not in index), None)
    if missing is not None:
        raise EnsError(f"{sample_path}: id '{missing}' has no image in {comp.test_images}/; "
                       "check test_images and test_id in the competition YAML")
    values = submission_values(comp, test_probs, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(sample_path), lineterminator="\n")
        writer.writeheader()
        for row in sample:
            writer.writerow(dict(row, **{comp.target_column: values[index[row[comp.id_column]]]}))
    tmp.replace(path)
    return path


def _bad_value(comp: Competition, value: str, labels: set) -> str | None:
    if comp.submission_kind == "label":
        return None if value in labels else f"label '{value}' is not one of the competition's classes"
    try:
        p = float(value)
    except ValueError:
        p = -1.0
    return None if 0.0 <= p <= 1.0 else f"'{value}' is not a probability between 0 and 1"


def check_submission(path: Path, sample_path: Path, comp: Competition, labels: list[str]) -> int:
    """Raise SubmissionError naming the first bad row unless `path` has the sample's columns, exactly its ids
    (each once) and only known labels (or probabilities, for a probability competition). Returns the number of
    rows. Row numbers count the header as row 1."""
    columns, sample_columns = _columns(path), _columns(sample_path)
    if columns != sample_columns:
        raise SubmissionError(f"{path}: columns {columns} differ from the sample submission's {sample_columns}")
    rows = _read(path, "submission")
    expected = {r[comp.id_column] for r in _read(sample_path, "sample submission")}
    known, seen = set(labels), set()
    for n, row in enumerate(rows, start=2):
        image_id, value = row[comp.id_column], row[comp.target_column]
        if image_id not in expected:
            raise SubmissionError(f"{path}: row {n}: id '{image_id}' is not in the sample submission")
        if image_id in seen:
            raise SubmissionError(f"{path}: row {n}: id '{image_id}' appears twice")
        problem = _bad_value(comp, value, known)
        if problem:
            raise SubmissionError(f"{path}: row {n}: {problem}")
        seen.add(image_id)
    if len(seen) < len(expected):
        first = next(r[comp.id_column] for r in _read(sample_path, "sample submission") if r[comp.id_column] not in seen)
        raise SubmissionError(f"{path}: id '{first}' of the sample submission is missing "
                              f"({len(expected) - len(seen)} ids missing in all)")
    return len(rows)


def score_submission(path: Path, solution_path: Path, comp: Competition) -> float | None:
    """The competition's metric on the known answers, as Kaggle would score the file."""
    rows = _read(path, "submission")
    return score_values([r[comp.id_column] for r in rows], [r[comp.target_column] for r in rows], solution_path, comp)


def score_values(ids: list[str], values: list[str], solution_path: Path, comp: Competition) -> float | None:
    """The metric of submitted values (labels, or positive-class probabilities) against the answers; None where
    the metric cannot be computed from them (log loss or ROC AUC of bare labels)."""
    truth = {r[comp.id_column]: r[comp.target_column] for r in _read(solution_path, "solution")}
    actual = [truth[i] for i in ids]
    if comp.submission_kind == "probability":
        from sklearn.metrics import roc_auc_score

        p = np.asarray(values, dtype=float)
        y = np.asarray([a == comp.positive_class for a in actual])
        if comp.metric == "roc_auc":
            return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
        if comp.metric == "log_loss":
            q = np.clip(p, 1e-15, 1 - 1e-15)
            return float(-np.mean(np.where(y, np.log(q), np.log(1 - q))))
        predicted = p >= 0.5
        if comp.metric == "accuracy":
            return float(np.mean(predicted == y))
        from sklearn.metrics import f1_score

        return float(f1_score(y, predicted, average="macro"))
    if comp.metric == "accuracy":
        return float(np.mean([p == a for p, a in zip(values, actual)]))
    if comp.metric == "f1_macro":
        from sklearn.metrics import f1_score

        return float(f1_score(actual, values, average="macro"))
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def append_history(history: Path, **row) -> None:
    rows = read_history(history)
    row.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_history(history, rows + [row])


def write_history(history: Path, rows: list[dict]) -> None:
    """Rewrite the whole history atomically (rows refreshed from Kaggle; older files with fewer columns)."""
    history.parent.mkdir(parents=True, exist_ok=True)
    tmp = history.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) or "" for k in HISTORY_COLUMNS})
    tmp.replace(history)


def read_history(history: Path) -> list[dict]:
    return _read(history, "history") if history.exists() else []


# --------------------------------------------------------------------------------------------- Kaggle
@dataclass
class Delivery:
    """Where a CSV went: the history row's destination/ref/status/score, and for the user a note or an error."""

    destination: str
    ref: str = ""
    status: str = ""
    score: str = ""
    note: str = ""  # one line worth telling the user
    error: str = ""  # one line when it failed: nothing reached Kaggle, the command must exit non-zero


def retry_command(csv_path: Path, competition: str, message: str) -> str:
    return f"ens submit {csv_path} --competition {competition} -m {shlex.quote(message)}"


def already_submitted(history: Path, sha256: str) -> dict | None:
    """The history row of an earlier upload of the same bytes (one that Kaggle did not reject)."""
    for row in reversed(read_history(history)):
        if row.get("sha256") == sha256 and row.get("destination") == "kaggle" and row.get("status") != "error":
            return row
    return None


def deliver_to_kaggle(comp: Competition, csv_path: Path, shown: str, message: str, history: Path, force: bool = False,
                      wait: bool = True, wait_seconds: float = 600) -> Delivery:
    """Upload a checked CSV, unless it would waste the quota: no submissions left today, or the same bytes were
    already uploaded (unless `force`). Then, unless `wait` is off, poll (bounded, with back-off) for its score."""
    from . import kaggle

    retry = retry_command(shown, comp.name, message)
    twin = already_submitted(history, file_sha256(csv_path))
    if twin and not force:
        return Delivery(f"not submitted: identical to {twin['file']} (ref {twin['ref']})",
                        note=f"not uploaded: identical to {twin['file']}, already submitted as ref {twin['ref']} "
                             f"({twin['status'] or 'pending'} {twin['score']}); add --force to upload it again")
    try:
        left = kaggle.remaining_submissions(comp.kaggle)
        if left == 0:
            raise kaggle.KaggleError(f"no submissions to '{comp.kaggle}' left today; Kaggle's quota resets at midnight UTC",
                                     "no submissions left today")
        ref = kaggle.submit(comp.kaggle, csv_path, message)
    except kaggle.KaggleError as e:
        return Delivery(f"not submitted: {e.reason}", error=f"{e}; the CSV is kept — retry: {retry}")
    if not wait:
        return Delivery("kaggle", ref, "pending", note=f"submitted as ref {ref}; `ens submissions {comp.name}` shows its score")
    try:
        found = kaggle.wait_for_score(comp.kaggle, ref, total_timeout=wait_seconds)
    except kaggle.KaggleError as e:
        return Delivery("kaggle", ref, "pending", note=f"submitted as ref {ref}, not scored yet ({e.reason}); "
                                                         f"`ens submissions {comp.name}` refreshes it")
    score = "" if found.get("public_score") is None else f"{found['public_score']:.6f}"
    if found["status"] == "error":
        return Delivery("kaggle", ref, "error", error=f"Kaggle could not score ref {ref}: "
                                                      f"{found.get('error_description') or 'no reason given'}")
    return Delivery("kaggle", ref, found["status"], score, note=f"submitted as ref {ref}: public score {score}")


def refresh_history(comp: Competition, history: Path) -> tuple[list[dict], str]:
    """The history with pending Kaggle rows updated from Kaggle's list of submissions; and a warning, if any."""
    rows = read_history(history)
    pending = [r for r in rows if r.get("destination") == "kaggle" and r.get("status") == "pending"]
    if not pending or not comp.kaggle:
        return rows, ""
    from . import kaggle

    try:
        listed = {s["ref"]: s for s in kaggle.list_submissions(comp.kaggle)}
    except kaggle.KaggleError as e:
        return rows, f"could not refresh pending scores: {e}"
    for row in pending:
        found = listed.get(row.get("ref"))
        if found:
            row["status"] = found["status"]
            row["score"] = "" if found.get("public_score") is None else f"{found['public_score']:.6f}"
    write_history(history, rows)
    return rows, ""
