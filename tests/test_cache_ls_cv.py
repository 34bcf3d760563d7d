"""`ens cache ls` with cross-validated members: a member's fold models (and refit) listed as one row, with their
folds and mean fold accuracy; the same member trained with other settings, holdout and damaged entries apart."""

import json
from pathlib import Path

import pytest

from conftest import ONE_RESNET, ens, make_project
from pipelines.config import Project

pytestmark = pytest.mark.slow  # trains real fold models

ONE = ONE_RESNET
CV = "validation: cv\nrefit: full\n" + ONE


def row(listing: str, *needles: str) -> str:
    """The one line of the listing holding every needle."""
    lines = [line for line in listing.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, (needles, listing)
    return lines[0]


def mean_accuracy(metas: list[dict]) -> str:
    return f"{sum(m['metrics']['plain_accuracy'] for m in metas) / len(metas):.4f}"


@pytest.fixture(scope="module")
def listings(tmp_path_factory, digits_data):
    """The listing after folds 0 and 1 of the cv member, then after everything: (project, first, last)."""
    from pipelines.run import run_ensemble

    root = make_project(tmp_path_factory.mktemp("ls_cv") / "project", digits_data, {"cv": CV, "one": ONE},
                        cv="{folds: 3}")
    run_ensemble(Project(root), "digits/cv.yaml", folds=[0, 1])
    first = ens("cache", "ls", cwd=root)
    run_ensemble(Project(root), "digits/cv.yaml")  # fold 2 and the refit
    run_ensemble(Project(root), "digits/cv.yaml", ["members.resnet.lr=0.01"], folds=[0])  # other settings
    run_ensemble(Project(root), "digits/one.yaml")  # the same member on the holdout
    (root / "cache" / "digits" / "0badc0ffee").mkdir()
    (root / "cache" / "digits" / "0badc0ffee" / "meta.json").write_text("{not json")
    last = ens("cache", "ls", cwd=root)
    assert first.returncode == 0 and last.returncode == 0, first.stderr + last.stderr
    return root, first.stdout, last.stdout


def metas(root: Path) -> list[dict]:
    folder = root / "cache" / "digits"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/meta.json")) if p.parent.name != "0badc0ffee"]


def test_two_folds_are_one_row_saying_2_of_3(listings):
    root, first, _ = listings
    folds = sorted((m for m in metas(root) if m["cv"] and m["cv"]["fold"] in (0, 1) and m["member"]["lr"] == 0.005),
                   key=lambda m: m["cv"]["fold"])
    line = row(first, "resnet")
    assert "folds 2/3 (0, 1)" in line and "refit" not in line
    assert f"{folds[0]['key']} +1" in line and folds[1]["key"] not in first  # one row: the fold-0 key, +1 more
    assert mean_accuracy(folds) in line


def test_refit_settings_holdout_and_damaged_entries(listings):
    root, _, last = listings
    entries = metas(root)
    ours = [m for m in entries if m["cv"] and m["member"]["lr"] == 0.005]
    assert len(ours) == 4 and sum(m["cv"]["fold"] == "refit" for m in ours) == 1
    assert next(m for m in ours if m["cv"]["fold"] == "refit")["metrics"] == {}  # no validation images
    line = row(last, "folds 3/3 (0, 1, 2) + refit")
    assert mean_accuracy([m for m in ours if m["cv"]["fold"] != "refit"]) in line  # the refit is not scored
    other = [m for m in entries if m["cv"] and m["member"]["lr"] == 0.01]
    assert mean_accuracy(other) in row(last, "folds 1/3 (0)")  # another lr: another group
    holdout = next(m for m in entries if m["cv"] is None)
    assert "holdout" in row(last, holdout["key"]) and mean_accuracy([holdout]) in row(last, holdout["key"])
    assert "damaged" in row(last, "0badc0ffee")
    assert len([line for line in last.splitlines() if "resnet" in line]) == 3
