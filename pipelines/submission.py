"""The submission CSV from test probabilities, its check against the sample submission, local scoring where the
answers are known, and the history of every submission."""

from __future__ import annotations

import csv
import hashlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .config import Competition
from .errors import EnsError

HISTORY_COLUMNS = ["time", "ensemble", "members", "keys", "metric", "valid_score", "file", "sha256",
                   "destination", "status", "score"]


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


def write_submission(path: Path, comp: Competition, sample_path: Path, test_ids: list[str],
                     test_probs: np.ndarray, vocab: list[str]) -> Path:
    """Labels from `test_probs` written in the sample submission's row order and columns."""
    index = {image_id: i for i, image_id in enumerate(test_ids)}
    sample = _read(sample_path, "sample submission")
    missing = next((r[comp.id_column] for r in sample if r[comp.id_column] not in index), None)
    if missing is not None:
        raise EnsError(f"{sample_path}: id '{missing}' has no image in {comp.test_images}/; "
                       "check test_images and test_id in the competition YAML")
    labels = np.asarray(vocab)[test_probs.argmax(1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(sample_path))
        writer.writeheader()
        for row in sample:
            writer.writerow(dict(row, **{comp.target_column: labels[index[row[comp.id_column]]]}))
    tmp.replace(path)
    return path


def check_submission(path: Path, sample_path: Path, comp: Competition, labels: list[str]) -> int:
    """Raise SubmissionError naming the first bad row unless `path` has the sample's columns, exactly its ids
    (each once) and only known labels. Returns the number of rows. Row numbers count the header as row 1."""
    columns, sample_columns = _columns(path), _columns(sample_path)
    if columns != sample_columns:
        raise SubmissionError(f"{path}: columns {columns} differ from the sample submission's {sample_columns}")
    rows = _read(path, "submission")
    expected = {r[comp.id_column] for r in _read(sample_path, "sample submission")}
    known, seen = set(labels), set()
    for n, row in enumerate(rows, start=2):
        image_id, label = row[comp.id_column], row[comp.target_column]
        if image_id not in expected:
            raise SubmissionError(f"{path}: row {n}: id '{image_id}' is not in the sample submission")
        if image_id in seen:
            raise SubmissionError(f"{path}: row {n}: id '{image_id}' appears twice")
        if label not in known:
            raise SubmissionError(f"{path}: row {n}: label '{label}' is not one of the competition's classes")
        seen.add(image_id)
    if len(seen) < len(expected):
        first = next(r[comp.id_column] for r in _read(sample_path, "sample submission") if r[comp.id_column] not in seen)
        raise SubmissionError(f"{path}: id '{first}' of the sample submission is missing "
                              f"({len(expected) - len(seen)} ids missing in all)")
    return len(rows)


def score_submission(path: Path, solution_path: Path, comp: Competition) -> float | None:
    """The competition's metric on the known answers, as Kaggle would score the file."""
    rows = _read(path, "submission")
    return score_labels([r[comp.id_column] for r in rows], [r[comp.target_column] for r in rows], solution_path, comp)


def score_labels(ids: list[str], predicted: list[str], solution_path: Path, comp: Competition) -> float | None:
    """The metric of predicted labels against the answers; None for metrics that need probabilities (a label
    file cannot be scored on log loss)."""
    truth = {r[comp.id_column]: r[comp.target_column] for r in _read(solution_path, "solution")}
    actual = [truth[i] for i in ids]
    if comp.metric == "accuracy":
        return float(np.mean([p == a for p, a in zip(predicted, actual)]))
    if comp.metric == "f1_macro":
        from sklearn.metrics import f1_score

        return float(f1_score(actual, predicted, average="macro"))
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def append_history(history: Path, **row) -> None:
    history.parent.mkdir(parents=True, exist_ok=True)
    new = not history.exists()
    row.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    with open(history, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})


def read_history(history: Path) -> list[dict]:
    return _read(history, "history") if history.exists() else []
