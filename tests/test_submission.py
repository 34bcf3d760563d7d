"""The submission check names the first bad row; local scoring; combining and metrics."""

import csv

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import log_loss as sk_log_loss

from conftest import ens
from pipelines import ensemble
from pipelines.config import Project, load_competition, load_ensemble
from pipelines.submission import SubmissionError, check_submission, score_submission, write_submission


def _write(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def sample(digits_data):
    with open(digits_data / "solution.csv") as f:
        return [tuple(r) for r in csv.reader(f)]


def test_check_accepts_the_answers_and_rejects_each_defect(project, digits_data, sample, tmp_path):
    comp = load_competition(Project(project), "digits")
    sample_path, labels = digits_data / "sample_submission.csv", [str(i) for i in range(10)]
    good = _write(tmp_path / "good.csv", sample)
    assert check_submission(good, sample_path, comp, labels) == 359
    assert score_submission(good, digits_data / "solution.csv", comp) == 1.0
    cases = {
        "missing": (sample[:5] + sample[6:], f"id '{sample[5][0]}' of the sample submission is missing (1 ids missing in all)"),
        "extra": (sample + [("test_9999.png", "3")], "row 361: id 'test_9999.png' is not in the sample submission"),
        "label": (sample[:3] + [(sample[3][0], "cat")] + sample[4:], "row 4: label 'cat' is not one of the competition's classes"),
        "twice": (sample[:3] + [sample[2]] + sample[4:], "row 4: id 'test_0001.png' appears twice"),
        "columns": ([("id", "label")] + sample[1:], "columns ['id', 'label'] differ"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(SubmissionError) as info:
            check_submission(_write(tmp_path / f"{name}.csv", rows), sample_path, comp, labels)
        assert message in str(info.value) and "\n" not in str(info.value), name
    result = ens("check", str(tmp_path / "label.csv"), "-c", "digits", cwd=project)
    assert result.returncode == 1 and "label 'cat'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_write_follows_the_sample_order(project, digits_data, tmp_path):
    comp = load_competition(Project(project), "digits")
    ids = ["test_0002.png", "test_0000.png", "test_0001.png"]
    sample = _write(tmp_path / "sample.csv", [("image_id", "label"), ("test_0000.png", "0"), ("test_0001.png", "0"),
                                              ("test_0002.png", "0")])
    probs = np.eye(3)[[2, 0, 1]]  # ids[i] gets class vocab[...]
    out = write_submission(tmp_path / "s.csv", comp, sample, ids, probs, ["a", "b", "c"])
    assert out.read_text().splitlines() == ["image_id,label", "test_0000.png,a", "test_0001.png,b", "test_0002.png,c"]


def test_combine_and_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    p1, p2 = rng.dirichlet(np.ones(4), 50), rng.dirichlet(np.ones(4), 50)
    y = rng.integers(0, 4, 50)
    np.testing.assert_allclose(ensemble.combine([p1, p2]), (p1 + p2) / 2)
    np.testing.assert_allclose(ensemble.combine([p1, p2], [3, 1]), 0.75 * p1 + 0.25 * p2)
    mixed = ensemble.combine([p1, p2], [1, 2])
    assert ensemble.accuracy(mixed, y) == accuracy_score(y, mixed.argmax(1))
    assert ensemble.log_loss(mixed, y) == pytest.approx(sk_log_loss(y, mixed, labels=range(4)))
    assert ensemble.f1_macro(mixed, y) == pytest.approx(f1_score(y, mixed.argmax(1), average="macro"))


# --------------------------------------------------------------------------------------------- concurrent writers
APPENDER = """
import sys, time
from pathlib import Path
from pipelines.submission import append_history
history, go, who, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
go.with_name(f"ready-{who}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(n):
    append_history(history, ensemble=who, file=f"{who}-{i}.csv", destination="local answers")
"""

REFRESHER = """
import sys, time
from pathlib import Path
from pipelines import kaggle
from pipelines.config import Project, load_competition, load_ensemble
from pipelines.submission import refresh_history
root, go, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
calls = []
def listing(slug, timeout=60):  # Kaggle's list: one more of the five pending submissions scored every 3 calls
    calls.append(1)
    return [{"ref": f"77{k}", "status": "complete" if done else "pending", "public_score": 0.5 if done else None,
             "file_name": "p.csv", "description": "m", "date": None, "error_description": ""}
            for k, done in ((k, k < len(calls) // 3) for k in range(5))]
kaggle.list_submissions = listing
comp = load_competition(Project(root), "digits")
go.with_name("ready-refresher").touch()
while not go.exists():
    time.sleep(0.005)
for _ in range(n):
    rows, warning = refresh_history(comp, root / "submissions/digits/history.csv")
    assert not warning, warning
"""


def test_concurrent_history_writers_lose_no_row(project, tmp_path):
    """Four processes appending 25 rows each while a fifth refreshes pending Kaggle rows: every row survives, and
    every refresh lands."""
    import subprocess
    import sys
    import time

    from pipelines.submission import append_history, read_history

    comp = project / "competitions/digits.yaml"
    comp.write_text(comp.read_text() + "kaggle: digits-demo\n")
    history = project / "submissions/digits/history.csv"
    for k in range(5):
        append_history(history, ensemble="first", file="p.csv", destination="kaggle", ref=f"77{k}", status="pending")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(history), str(go), f"w{k}", "25"],
                              stderr=subprocess.PIPE, text=True) for k in range(4)]
    procs.append(subprocess.Popen([sys.executable, "-c", REFRESHER, str(project), str(go), "15"],
                                  stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 5 and time.monotonic() < deadline:  # all imported and waiting
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, errors
    rows = read_history(history)
    assert len(rows) == 105
    assert sorted(r["file"] for r in rows if r["ensemble"] != "first") == sorted(
        f"w{k}-{i}.csv" for k in range(4) for i in range(25))
    assert [(r["ref"], r["status"], r["score"]) for r in rows if r["ensemble"] == "first"] == [
        (f"77{k}", "complete", "0.500000") for k in range(5)]
    assert [p.name for p in history.parent.iterdir() if ".tmp" in p.name] == []  # no temp file left behind


def test_two_runs_in_the_same_second_get_two_complete_csvs(project, digits_data, monkeypatch):
    """Two blends of one ensemble written at once, in the same second: two names, two complete checked CSVs."""
    import threading
    from datetime import datetime as real_datetime
    from types import SimpleNamespace as NS

    from pipelines import run, submission
    from pipelines.submission import read_history

    class Frozen(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime(2026, 11, 27, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(run, "datetime", Frozen)
    slow = submission.submission_values
    monkeypatch.setattr(submission, "submission_values",  # a loaded machine: writing takes a while
                        lambda *a: (threading.Event().wait(0.3), slow(*a))[1])
    proj = Project(project)
    comp = load_competition(proj, "digits")
    with open(digits_data / "sample_submission.csv") as f:
        ids = [r["image_id"] for r in csv.DictReader(f)]
    vocab = [str(i) for i in range(10)]
    g = NS(competition=comp, data=NS(root=digits_data, test_ids=ids, vocab=vocab),
           path=project / "ensembles/digits/tiny.yaml", cv=False, blend_folds=lambda: np.arange(40) % 5,
           ensemble=load_ensemble(proj, "digits/tiny.yaml", [])[1], overrides=[])

    def outcome(seed):
        rng = np.random.default_rng(seed)
        arrays = {"valid_targets": rng.integers(0, 10, 40), "valid": rng.dirichlet(np.ones(10), 40),
                  "test": rng.dirichlet(np.ones(10), len(ids))}
        return NS(member=NS(name=f"m{seed}"), folds=[], entry=NS(arrays=arrays, key=f"k{seed}",
                                                                 probs=lambda split, kind: arrays[split]))

    results, failures = {}, []

    def blend(seed):
        try:
            results[seed] = run.blend_and_submit(proj, g, [outcome(seed)], [1.0], "tiny", "tta", submit=False)
        except BaseException as e:  # noqa: BLE001
            failures.append(repr(e))

    threads = [threading.Thread(target=blend, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    paths = {results[s].csv for s in (1, 2)}
    assert len(paths) == 2 and all(p.name.startswith("20261127-120000-tiny") for p in paths)
    sample_path = digits_data / "sample_submission.csv"
    for seed in (1, 2):
        b = results[seed]
        assert check_submission(b.csv, sample_path, comp, vocab) == 359  # complete, and each its own
        expected = np.asarray(vocab)[outcome(seed).entry.arrays["test"].argmax(1)]
        with open(b.csv) as f:
            assert [r["label"] for r in csv.DictReader(f)] == list(expected)
    assert sorted(r["file"] for r in read_history(project / "submissions/digits/history.csv")) == sorted(
        proj.relative(p) for p in paths)
    assert [p.name for p in (project / "submissions/digits").iterdir() if ".tmp" in p.name] == []


def test_a_row_with_a_field_too_few_or_too_many_is_named(project, digits_data, sample, tmp_path):
    """Issue 24 item 13: a short row of a probability CSV was a TypeError; a row with an extra field passed the
    probability check (and would be uploaded) and was refused in a label CSV as an id '' not in the sample."""
    from pipelines.config import Competition

    sample_path = digits_data / "sample_submission.csv"
    odd = Competition(name="oddeven", submission_kind="probability", positive_class="odd", metric="roc_auc")
    probs = [sample[0]] + [(i, "0.5") for i, _ in sample[1:]]
    short = probs[:2] + [(probs[2][0],)] + probs[3:]
    extra = probs[:2] + [(*probs[2], "0.7")] + probs[3:]
    for rows in (short, extra):
        with pytest.raises(SubmissionError) as info:
            check_submission(_write(tmp_path / "p.csv", rows), sample_path, odd, ["even", "odd"])
        assert f"row 3 has {len(rows[2])} fields, the header 2" in str(info.value)
    digits = load_competition(Project(project), "digits")
    labels = sample[:2] + [(*sample[2], "")] + sample[3:]  # a trailing comma: an empty third field
    _write(tmp_path / "extra.csv", labels)
    result = ens("check", str(tmp_path / "extra.csv"), "-c", "digits", cwd=project)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "row 3 has 3 fields, the header 2" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    blank = _write(tmp_path / "blank.csv", sample)
    blank.write_text(blank.read_text() + "\n")  # a blank last line is no row, as before
    assert check_submission(blank, sample_path, digits, [str(i) for i in range(10)]) == 359


def test_a_sample_submission_with_a_byte_order_mark_reads_as_without(digits_data, tmp_path):
    """Issue 24 item 12: a UTF-8 BOM (as Excel writes) stuck to the first column's name wherever a CSV was read
    without utf-8-sig: the sample's id column was not found, the submission's columns differed."""
    from pipelines.config import Competition
    from pipelines.data import check_sample_ids, list_test

    sample_path = tmp_path / "sample_submission.csv"
    sample_path.write_bytes(b"\xef\xbb\xbf" + (digits_data / "sample_submission.csv").read_bytes())
    comp = Competition(name="digits", sample_submission=str(sample_path))
    test = list_test(comp, digits_data)
    check_sample_ids(comp, digits_data, test)  # finds image_id
    ids = [p.rsplit("/", 1)[-1] for p in test]
    out = write_submission(tmp_path / "s.csv", comp, sample_path, ids, np.eye(10)[np.arange(len(ids)) % 10],
                           [str(i) for i in range(10)])
    assert out.read_text().startswith("image_id,label\n")  # no BOM carried into the upload
    assert check_submission(out, sample_path, comp, [str(i) for i in range(10)]) == len(ids)
