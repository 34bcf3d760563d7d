"""The submission CSV from test probabilities, its check against the sample submission, local scoring where the
answers are known, and the history of every submission."""

from __future__ import annotations

import csv
import hashlib
import glob
import shlex
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .config import Competition, Project
from .errors import EnsError
from .util import file_lock, read_csv, read_csv_rows, sweep_dead, unique_suffix

HISTORY_COLUMNS = ["time", "ensemble", "members", "keys", "metric", "valid_score", "file", "sha256",
                   "destination", "ref", "status", "score", "message", "id", "note",
                   "dataset", "notebook",  # a code competition's: its weights' dataset (and content), owner/slug/version
                   "overrides", "ensemble_hash"]  # the run's command-line overrides; `run_hash` of what it resolved to
# (new columns go last: older history files, without them, read as before and gain them empty when rewritten)

# what Kaggle's errors of a code submission (its re-run on the hidden test set) mean, and what to do
ERROR_HINTS = {
    "notebook timeout": "the notebook ran out of time on the hidden test set: fewer members, folds or TTA passes, "
                        "or a smaller size (ens kaggle push estimates the time: set notebook.hidden_test_images)",
    "notebook threw exception": "the notebook failed on the hidden test set (a file it could not read, memory): "
                                "look at the rerun's log on the competition's submissions page",
    "submission csv not found": "the notebook wrote no submission file on the hidden test set: check "
                                "notebook.output in the competition's YAML",
    "submission scoring error": "Kaggle could not score the notebook's CSV: check the ids and columns against the "
                                "sample submission",
}


def error_hint(description: str) -> str:
    """Kaggle's error description, with what it means when it is one of the known classes."""
    low = description.lower()
    hint = next((h for k, h in ERROR_HINTS.items() if k in low), "")
    return f"{description}: {hint}" if hint else (description or "no reason given")


class SubmissionError(EnsError):
    """A CSV that would be rejected (or silently mis-scored) by the competition."""


def _raw(path: Path, what: str) -> list[list[str]]:
    try:
        return read_csv_rows(path)
    except FileNotFoundError:
        raise EnsError(f"{path}: the {what} is missing") from None


def _read(path: Path, what: str) -> list[dict]:
    try:
        return read_csv(path)[1]
    except FileNotFoundError:
        raise EnsError(f"{path}: the {what} is missing") from None


def _columns(path: Path) -> list[str]:
    return (_raw(path, "CSV") or [[]])[0]


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
    tmp = path.with_name(path.name + unique_suffix())  # this process's own: a concurrent writer has another
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_columns(sample_path), lineterminator="\n")
            writer.writeheader()
            for row in sample:
                writer.writerow(dict(row, **{comp.target_column: values[index[row[comp.id_column]]]}))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def reserve_csv(folder: Path, stem: str) -> Path:
    """A new, empty `<stem>.csv` in `folder` (else `<stem>-2.csv`, ...), created atomically (O_EXCL): two runs of
    one ensemble in the same second get two names, never one file."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = folder / (f"{stem}.csv" if n == 1 else f"{stem}-{n}.csv")
        try:
            with open(path, "x"):
                return path
        except FileExistsError:
            continue
    raise EnsError(f"{folder}: 10000 submissions named {stem}*.csv already; move some away")


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
    columns, *lines = _raw(path, "submission") or [[]]
    sample_columns = _columns(sample_path)
    if columns != sample_columns:
        raise SubmissionError(f"{path}: columns {columns} differ from the sample submission's {sample_columns}")
    rows = []
    for n, line in enumerate(lines, start=2):
        if not line:  # a blank line: no row (as csv.DictReader reads it)
            continue
        if len(line) != len(columns):  # a cell too few or too many: Kaggle refuses it or reads it shifted
            raise SubmissionError(f"{path}: row {n} has {len(line)} fields, the header {len(columns)}: "
                                  f"{','.join(line)[:80] or '(an empty line)'}")
        rows.append(dict(zip(columns, line)))
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


def run_hash(ens, comp: Competition, name: str | None = None, probs: str | None = None, combine=None,
             weights: list[float] | None = None) -> str:
    """What tells runs apart: a hash of the resolved ensemble and competition (every override applied) and of the
    blend made of it (CSV name, probabilities, combine, weights; by default the ensemble's own, as `ens run`
    blends). Equal hashes and equal member keys make the same CSV."""
    import json

    blend = {"name": name, "probs": probs or ens.probs,
             "combine": (combine or ens.combine).model_dump(mode="json"),
             "weights": list(weights) if weights is not None else [m.weight for m in ens.members]}
    text = json.dumps({"ensemble": ens.model_dump(mode="json", exclude={"tracking"}),  # where it is recorded: not what
                       "competition": comp.model_dump(mode="json"),
                       "blend": blend}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shown_overrides(overrides) -> str:
    """A run's overrides as typed on the command line (quoted where needed), '' without."""
    return " ".join(shlex.quote(o) for o in overrides)


def unchanged_csv(history: Path, root: Path, ensemble_hash: str, keys: str) -> dict | None:
    """The history row of the CSV an earlier run with the same `run_hash` and member keys wrote, when that file
    is still there with the bytes recorded: a rerun that would write the same CSV points at it instead."""
    for row in reversed(read_history(history)):
        if row.get("ensemble_hash") != ensemble_hash or row.get("keys") != keys or not row.get("file"):
            continue
        path = Path(row["file"]) if Path(row["file"]).is_absolute() else root / row["file"]
        if path.is_file() and file_sha256(path) == row.get("sha256"):
            return dict(row, path=path)
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- history
# history.csv is shared by every ens process of the project (two `ens run`s, `ens run` and `ens submissions`):
# each change is a read-modify-write of the whole file under an exclusive lock on a sibling lock file, through a
# temporary file of the process's own, renamed into place. Readers need no lock: they see the old or the new file.


def _history_lock(history: Path):
    return file_lock(history.with_name(f".{history.name}.lock"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_history(history: Path, **row) -> str:
    """Add one row; returns its id (for `update_history`)."""
    row.setdefault("time", _now())
    row.setdefault("id", uuid.uuid4().hex[:12])
    with _history_lock(history):
        _write_history(history, read_history(history) + [row])
    return row["id"]


def update_history(history: Path, row_id: str, **fields) -> None:
    """Change the row `row_id` in place (re-read under the lock: rows added meanwhile by others stay)."""
    with _history_lock(history):
        rows = read_history(history)
        for row in rows:
            if row.get("id") == row_id:
                row.update(fields)
        _write_history(history, rows)


def claim_history(history: Path, row_id: str, statuses: tuple[str, ...], **fields) -> dict:
    """Set `fields` on the row `row_id` only if its status is one of `statuses`, checked and written in one locked
    step (two processes about to submit one notebook: one claims it, the other sees the claim). The row as it
    was before; the caller claimed it when its status is one of `statuses`."""
    with _history_lock(history):
        rows = read_history(history)
        row = next((r for r in rows if r.get("id") == row_id), None)
        if row is None:
            raise EnsError(f"{history}: no row {row_id} (edited meanwhile?)")
        before = dict(row)
        if row.get("status") in statuses:
            row.update(fields)
            _write_history(history, rows)
    return before


def _write_history(history: Path, rows: list[dict]) -> None:
    """Rewrite the whole history atomically (older files with fewer columns gain the new ones). Hold the lock."""
    history.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(history.parent, [f"{glob.escape(history.name)}.tmp{{owner}}", f"{glob.escape(history.name)}.tmp{{owner}}-*"])  # of writers killed mid-write
    tmp = history.with_name(history.name + unique_suffix())
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k) or "" for k in HISTORY_COLUMNS})
        tmp.replace(history)
    finally:
        tmp.unlink(missing_ok=True)


def read_history(history: Path) -> list[dict]:
    return _read(history, "history") if history.exists() else []


# --------------------------------------------------------------------------------------------- Kaggle
UNKNOWN = "unknown"  # the status of an upload cut off before Kaggle answered: it may or may not be submitted


class Interrupted(EnsError):
    """Ctrl-C during an upload or the wait for its score: what the history holds, and what to do next."""

    exit_code = 130


@dataclass
class Delivery:
    """Where a CSV went: the history row's destination/ref/status/score, and for the user a note or an error."""

    destination: str
    ref: str = ""
    status: str = ""
    score: str = ""
    note: str = ""  # one line worth telling the user
    error: str = ""  # one line when it failed (or may have): the command must exit non-zero
    row_id: str = ""  # the history row deliver_to_kaggle wrote


def retry_command(csv_path: Path, competition: str, message: str) -> str:
    return f"ens submit {csv_path} --competition {competition} -m {shlex.quote(message)}"


def _twin(rows: list[dict], sha256: str) -> dict | None:
    for row in reversed(rows):
        if row.get("sha256") == sha256 and row.get("destination") == "kaggle" and row.get("status") != "error":
            return row
    return None


def already_submitted(history: Path, sha256: str) -> dict | None:
    """The history row of an earlier upload of the same bytes that Kaggle did not reject, or may have received
    (status unknown)."""
    return _twin(read_history(history), sha256)


def _refusal(twin: dict, competition: str) -> tuple[str, str]:
    """The history destination and the user's note for not uploading bytes already (maybe) on Kaggle."""
    if twin.get("status") == UNKNOWN:
        return (f"not submitted: identical to {twin['file']} (its upload's outcome is unknown)",
                f"not uploaded: identical to {twin['file']}, whose upload may have reached Kaggle (outcome unknown): "
                f"check `ens submissions {competition}` first; if Kaggle does not have it, add --force to upload it")
    return (f"not submitted: identical to {twin['file']} (ref {twin['ref']})",
            f"not uploaded: identical to {twin['file']}, already submitted as ref {twin['ref']} "
            f"({twin['status'] or 'pending'} {twin['score']}); add --force to upload it again")


def deliver_to_kaggle(comp: Competition, csv_path: Path, shown: str, message: str, history: Path, force: bool = False,
                      wait: bool = True, wait_seconds: float = 600, record: dict | None = None) -> Delivery:
    """Upload a checked CSV, unless it would waste the quota: no submissions left today, or the same bytes were
    already uploaded, or may have been (unless `force`). Then, unless `wait` is off, poll (bounded, with
    back-off) for its score.

    The history row (`record`: ensemble, members, keys, valid_score, ...; plus file, checksum, message and where
    it went) is written as the delivery goes, so a run stopped at any moment leaves the truth behind: `unknown`
    from just before the upload (the check for an identical upload and this row are one locked step, so two
    runs of one CSV send it once), `pending` with the ref as soon as Kaggle accepts it, then the score. An
    upload cut off before Kaggle answered stays `unknown` (`ens submissions` looks for it on Kaggle's list)."""
    from . import kaggle

    sha = file_sha256(csv_path)
    row = dict(record or {}, file=shown, sha256=sha, message=message)
    row.setdefault("metric", comp.metric)
    retry = retry_command(Project.shown(csv_path), comp.name, message)  # typed as is from the current folder

    def refuse(twin: dict) -> Delivery:
        destination, note = _refusal(twin, comp.name)
        return Delivery(destination, note=note, row_id=append_history(history, **row, destination=destination))

    def fail(e, row_id: str = "") -> Delivery:
        destination = f"not submitted: {e.reason}"
        if row_id:
            update_history(history, row_id, destination=destination, status="", note="")
        else:
            row_id = append_history(history, **row, destination=destination)
        return Delivery(destination, error=f"{e}; the CSV is kept — retry: {retry}", row_id=row_id)

    twin = None if force else already_submitted(history, sha)
    if twin:
        return refuse(twin)
    try:
        left = kaggle.remaining_submissions(comp.kaggle)
        if left == 0:
            raise kaggle.KaggleError(f"no submissions to '{comp.kaggle}' left today; Kaggle's quota resets at midnight UTC",
                                     "no submissions left today")
    except kaggle.KaggleError as e:
        return fail(e)
    with _history_lock(history):  # checked again and claimed in one step: a concurrent run may have sent it
        rows = read_history(history)
        twin = None if force else _twin(rows, sha)
        if twin is None:
            row_id = uuid.uuid4().hex[:12]
            _write_history(history, rows + [dict(row, time=_now(), id=row_id, destination="kaggle", status=UNKNOWN,
                                                 note="uploading; if this stays, ens stopped before Kaggle answered")])
    if twin:
        return refuse(twin)
    try:
        ref = kaggle.submit(comp.kaggle, csv_path, message)
    except kaggle.KaggleError as e:
        if not e.maybe_submitted:
            return fail(e, row_id)
        update_history(history, row_id, note=f"{e.reason}: Kaggle may have it")
        return Delivery("kaggle", status=UNKNOWN, row_id=row_id, error=(
            f"upload outcome unknown ({e.reason} while submitting {csv_path.name}): Kaggle may have received it — "
            f"check `ens submissions {comp.name}` (it looks for it on Kaggle's list) before sending it again with "
            "--force; the CSV is kept"))
    except KeyboardInterrupt:
        update_history(history, row_id, note="interrupted during the upload: Kaggle may have it")
        raise Interrupted(f"interrupted during the upload of {shown}: Kaggle may have received it, so it is recorded "
                          f"as unknown; `ens submissions {comp.name}` looks for it on Kaggle's list") from None
    update_history(history, row_id, ref=ref, status="pending", note="")
    if not wait:
        return Delivery("kaggle", ref, "pending", row_id=row_id,
                        note=f"submitted as ref {ref}; `ens submissions {comp.name}` shows its score")
    try:
        found = kaggle.wait_for_score(comp.kaggle, ref, total_timeout=wait_seconds)
    except kaggle.KaggleError as e:
        return Delivery("kaggle", ref, "pending", row_id=row_id, note=f"submitted as ref {ref}, not scored yet "
                        f"({e.reason}); `ens submissions {comp.name}` refreshes it")
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while waiting for the public score: {shown} is submitted as ref {ref} and "
                          f"recorded as pending; `ens submissions {comp.name}` fetches its score") from None
    score = "" if found.get("public_score") is None else f"{found['public_score']:.6f}"
    if found["status"] == "error":
        reason = error_hint(found.get("error_description") or "")
        update_history(history, row_id, status="error", note=reason)
        return Delivery("kaggle", ref, "error", row_id=row_id, error=f"Kaggle could not score ref {ref}: {reason}")
    update_history(history, row_id, status=found["status"], score=score)
    return Delivery("kaggle", ref, found["status"], score, row_id=row_id,
                    note=f"submitted as ref {ref}: public score {score}")


def _row_key(row: dict):
    return row.get("id") or ("ref", row.get("ref"), row.get("time"))  # rows written before ids existed


CLOCK_SKEW = timedelta(minutes=10)  # Kaggle's clock and this machine's may differ: older listed submissions only


def _when(text: str | None) -> datetime | None:
    try:
        when = datetime.fromisoformat((text or "").replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _listed_as(row: dict, listed: list[dict], claimed: set, comp: Competition) -> dict | None:
    """The submission on Kaggle's list that an `unknown` row's upload became: same file name (a notebook's: its
    output file), same description, not made before the row was written, not already some other row's ref (the
    oldest such, the list being newest first)."""
    notebook = row.get("destination") == "kaggle notebook"
    name = comp.notebook.output if notebook else Path(row.get("file") or "").name
    message, since = (row.get("message") or "").strip(), _when(row.get("time"))
    matches = [s for s in listed if s["ref"] not in claimed and s.get("file_name") == name
               and (s.get("description") or "").strip() == message
               and not (since and _when(s.get("date")) and _when(s.get("date")) < since - CLOCK_SKEW)]
    return matches[-1] if matches else None


def refresh_history(comp: Competition, history: Path) -> tuple[list[dict], str]:
    """The history with its open Kaggle rows settled from Kaggle's list of submissions: `pending` rows get their
    status and score; `unknown` rows (an upload cut off before Kaggle answered) become the listed submission
    with their file name and description, when there is one. Returns the rows, and a warning or ""."""
    rows = read_history(history)
    todo = [r for r in rows if r.get("destination") in ("kaggle", "kaggle notebook")
            and r.get("status") in ("pending", UNKNOWN)]
    if not todo or not comp.kaggle:
        return rows, ""
    from . import kaggle

    try:
        listed = kaggle.list_submissions(comp.kaggle)  # outside the lock: others may write meanwhile
    except kaggle.KaggleError as e:
        return rows, f"could not refresh pending scores: {e}"
    by_ref = {s["ref"]: s for s in listed}
    claimed = {r["ref"] for r in rows if r.get("ref")}
    changes, unresolved = {}, []
    for row in todo:
        found = by_ref.get(row["ref"]) if row.get("ref") else _listed_as(row, listed, claimed, comp)
        if found is None:
            if row.get("status") == UNKNOWN:
                unresolved.append(row)
            continue
        claimed.add(found["ref"])
        fields = {"ref": found["ref"], "status": found["status"],
                  "score": "" if found.get("public_score") is None else f"{found['public_score']:.6f}"}
        if found["status"] == "error":
            fields["note"] = error_hint(found.get("error_description") or "")
        elif row.get("status") == UNKNOWN:
            fields["note"] = "found on Kaggle's list by its file name and description"
        if any((row.get(k) or "") != v for k, v in fields.items()):
            changes[_row_key(row)] = fields
    if changes:
        with _history_lock(history):
            rows = read_history(history)  # as it is now, with what others wrote since
            for row in rows:
                fields = changes.get(_row_key(row))
                if fields and row.get("status") in ("pending", UNKNOWN):
                    row.update(fields)
            _write_history(history, rows)
    resent = {r.get("sha256") for r in rows if r.get("destination") == "kaggle" and r.get("ref")}
    unresolved = [r for r in unresolved if r.get("sha256") not in resent]  # sent again since (--force): moot
    warning = ""
    if unresolved:
        first = unresolved[0]
        again = (f"ens kaggle submit {comp.name} {first['notebook']} --force" if first.get("notebook")
                 else f"{retry_command(first['file'], comp.name, first.get('message') or '')} --force")
        warning = (f"{len(unresolved)} upload(s) of unknown outcome are not on Kaggle's latest list, e.g. "
                   f"{first.get('notebook') or first['file']} of {first['time']}: if the competition's submissions "
                   f"page does not show it either, send it again: {again}")
    return rows, warning
