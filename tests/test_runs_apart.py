"""Runs told apart (issue 27 item 2): each run's overrides and the hash of its resolved ensemble are recorded in
the history, the validation JSON and the Kaggle message, shown by `ens submissions`, name the report; a rerun
that would write the same CSV points at it instead of writing a copy."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from conftest import copy_project, ens
from pipelines import run
from pipelines.config import Project, load_competition, load_ensemble
from pipelines.submission import append_history, read_history, run_hash

OLD_COLUMNS = ["time", "ensemble", "members", "keys", "metric", "valid_score", "file", "sha256", "destination",
               "ref", "status", "score", "message", "id", "note", "dataset", "notebook"]


def _gathered(project: Path, digits_data: Path, overrides: list[str]):
    proj = Project(project)
    path, ensemble, comp = load_ensemble(proj, "digits/tiny.yaml", overrides)
    with open(digits_data / "sample_submission.csv") as f:
        ids = [r["image_id"] for r in csv.DictReader(f)]
    return proj, NS(competition=comp, data=NS(root=digits_data, test_ids=ids, vocab=[str(i) for i in range(10)]),
                    path=path, cv=False, blend_folds=lambda: np.arange(40) % 5, ensemble=ensemble,
                    overrides=overrides)


def _outcome(n_test: int, key: str = "k1"):
    rng = np.random.default_rng(1)
    arrays = {"valid_targets": rng.integers(0, 10, 40), "valid": rng.dirichlet(np.ones(10), 40),
              "test": rng.dirichlet(np.ones(10), n_test)}
    return NS(member=NS(name="m"), folds=[], entry=NS(arrays=arrays, key=key, probs=lambda split, kind: arrays[split]))


def test_an_unchanged_rerun_points_at_its_csv_and_overrides_are_recorded(project, digits_data):
    history = project / "submissions/digits/history.csv"
    proj, g = _gathered(project, digits_data, [])
    o = _outcome(len(g.data.test_ids))
    first = run.blend_and_submit(proj, g, [o], [1.0], "tiny", "tta", submit=False)
    again = run.blend_and_submit(proj, g, [o], [1.0], "tiny", "tta", submit=False)
    assert again.csv == first.csv and again.unchanged.startswith(f"unchanged: {Project.shown(first.csv)} (written at ")
    assert len(read_history(history)) == 1 and len(list(history.parent.glob("*.csv"))) == 2  # the CSV + history

    other = run.blend_and_submit(proj, g, [_outcome(len(g.data.test_ids), "k2")], [1.0], "tiny", "tta", submit=False)
    assert other.csv != first.csv and not other.unchanged  # another member key: a new CSV

    proj, g2 = _gathered(project, digits_data, ["defaults.lr=0.01"])
    changed = run.blend_and_submit(proj, g2, [o], [1.0], "tiny", "tta", submit=False)
    assert changed.csv not in (first.csv, other.csv) and not changed.unchanged
    rows = read_history(history)
    assert len(rows) == 3
    assert [r["overrides"] for r in rows] == ["", "", "defaults.lr=0.01"]
    assert rows[0]["ensemble_hash"] == rows[1]["ensemble_hash"] != rows[2]["ensemble_hash"]
    assert rows[2]["ensemble_hash"] == run_hash(g2.ensemble, g2.competition, "tiny", "tta", None, [1.0])
    assert "defaults.lr=0.01" in rows[2]["message"] and f"#{rows[2]['ensemble_hash'][:8]}" in rows[2]["message"]
    validation = json.loads(changed.csv.with_suffix(".validation.json").read_text())
    assert validation["overrides"] == ["defaults.lr=0.01"] and validation["ensemble_hash"] == rows[2]["ensemble_hash"]


def test_old_history_files_stay_readable(project):
    history = project / "submissions/digits/history.csv"
    history.parent.mkdir(parents=True)
    with open(history, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=OLD_COLUMNS)
        w.writeheader()
        w.writerow({"time": "2026-11-27T12:00:00+00:00", "ensemble": "ensembles/digits/tiny.yaml", "file":
                    "submissions/digits/old.csv", "destination": "local answers", "valid_score": "0.9"})
    append_history(history, ensemble="ensembles/digits/tiny.yaml", file="submissions/digits/new.csv",
                   overrides="defaults.epochs=2", ensemble_hash="0123456789abcdef")
    rows = read_history(history)
    assert rows[0]["file"] == "submissions/digits/old.csv" and rows[0]["overrides"] == ""
    assert rows[1]["overrides"] == "defaults.epochs=2"
    out = ens("submissions", "digits", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "defaults.epochs=2" in out.stdout and "01234567" in out.stdout and "old.csv" in out.stdout


def test_the_submissions_table_never_cuts_what_tells_runs_apart(project):
    """Two runs in one second (<stamp>-tiny-2.csv) on a fast CI machine: the table's file column grew and cut the
    overrides to 'members.resnet.weig…' (a path has no space to wrap at); they stay whole, and long paths fold."""
    history = project / "submissions/digits/history.csv"
    for i, extra in enumerate(("", "members.resnet.weight=2 members.convnext.lr=0.003")):
        append_history(history, ensemble="ensembles/digits/a-rather-long-ensemble-name.yaml", valid_score="0.9930",
                       file=f"submissions/digits/20261205-001234-a-rather-long-ensemble-name{'-2' * i}.csv",
                       destination="local answers", overrides=extra, ensemble_hash=f"{i}123456789abcdef")
    out = ens("submissions", "digits", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "members.resnet.weight=2 members.convnext.lr=0.003" in out.stdout and "11234567" in out.stdout
    assert "…" not in out.stdout, out.stdout


@pytest.mark.slow
def test_warm_reruns_and_reports_told_apart(tiny_run, tmp_path):
    root = copy_project(tiny_run[0], tmp_path / "p")
    first = ens("run", "digits/tiny.yaml", cwd=root)
    assert first.returncode == 0, first.stderr
    again = ens("run", "digits/tiny.yaml", cwd=root)
    assert again.returncode == 0, again.stderr
    assert "unchanged: submissions/digits/" in again.stdout and "(written at" in again.stdout
    weighted = ens("run", "digits/tiny.yaml", "members.resnet.weight=2", cwd=root)
    assert weighted.returncode == 0, weighted.stderr
    rows = read_history(root / "submissions/digits/history.csv")
    assert len(rows) == 2 and len(list((root / "submissions/digits").glob("*-tiny*.csv"))) == 2
    assert rows[1]["overrides"] == "members.resnet.weight=2" and rows[0]["ensemble_hash"] != rows[1]["ensemble_hash"]
    listed = ens("submissions", "digits", cwd=root)
    assert "members.resnet.weight=2" in listed.stdout and rows[1]["ensemble_hash"][:8] in listed.stdout

    report = ens("report", "digits/tiny.yaml", "members.resnet.weight=2", "--cached-only", cwd=root)
    assert report.returncode == 0, report.stderr
    plain = ens("report", "digits/tiny.yaml", "--cached-only", cwd=root)
    assert plain.returncode == 0, plain.stderr
    names = sorted(p.name for p in (root / "submissions/digits").glob("report-*.html"))
    assert names == sorted(["report-tiny.html", f"report-tiny-{rows[1]['ensemble_hash'][:8]}.html"])


@pytest.mark.slow
def test_a_rerun_whose_csv_would_differ_writes_a_new_one(tiny_run, tmp_path):
    """Equal hashes and member keys are not enough (a review): a member retrained under its key (its entry gone,
    other threads) or an edited sample submission gives other bytes, so the rerun writes and records a new CSV."""
    root = copy_project(tiny_run[0], tmp_path / "p")
    data_dir = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_run[1].gathered.data.root, data_dir)
    comp_yaml = root / "competitions" / "digits.yaml"
    comp_yaml.write_text(comp_yaml.read_text().replace(str(tiny_run[1].gathered.data.root), str(data_dir)))
    first = ens("run", "digits/tiny.yaml", cwd=root)
    assert first.returncode == 0, first.stderr
    again = ens("run", "digits/tiny.yaml", cwd=root)
    assert "unchanged:" in again.stdout, again.stdout  # the fixture: a plain rerun points at its CSV
    sample = data_dir / "sample_submission.csv"
    head, *rows = sample.read_text().splitlines()
    sample.write_text("\n".join([head, *reversed(rows)]) + "\n")  # the same ids in another order
    changed = ens("run", "digits/tiny.yaml", cwd=root)
    assert changed.returncode == 0, changed.stderr
    assert "unchanged:" not in changed.stdout, changed.stdout
    # the history's newest row, not the newest name: two runs in one second are <stamp>-tiny.csv, <stamp>-tiny-2.csv
    written = root / read_history(root / "submissions" / "digits" / "history.csv")[-1]["file"]
    assert written.read_text().splitlines()[1].split(",")[0] == rows[-1].split(",")[0]  # in the sample's new order
