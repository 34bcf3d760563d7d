"""`ens tune` of a cross-validated ensemble: trials train on the other folds and are scored on fold 0 of the
competition's cv (not on the holdout), in a study of their own."""

import pytest
from rich.console import Console

from conftest import make_project
from pipelines.config import Project
from pipelines.errors import EnsError

pytestmark = pytest.mark.slow  # trains real fold models

CV = """\
competition: digits
validation: cv
defaults:
  pretrained: false
  size: 32
  epochs: 8
  lr: 0.005
  batch_size: 64
  num_workers: 0
  tta: {n: 0}
  tune:
    trials: 1
    epochs: 1
    fraction: 0.25
    pruner: none
    space:
      lr: {low: 5.0e-3, high: 5.0e-2, log: true}
members:
  - {name: resnet, arch: test_resnet}
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, digits_data):
    """One trial on the cv ensemble and one on it validated on the holdout, recording what each trial trained on:
    (project, cv result, holdout result, [data of each trial])."""
    import pipelines.train
    from pipelines.tune import tune_member

    root = make_project(tmp_path_factory.mktemp("tune_cv") / "project", digits_data, {"cv": CV}, cv="{folds: 3}")
    seen, real = [], pipelines.train.train_member

    def recording(member, data, *a, **k):
        seen.append(data)
        return real(member, data, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipelines.train, "train_member", recording)
        cv = tune_member(Project(root), "digits/cv.yaml", "resnet")
        holdout = tune_member(Project(root), "digits/cv.yaml", "resnet", ["validation=holdout"])
    return root, cv, holdout, seen


def folds(root):
    from pipelines.config import load_ensemble
    from pipelines.data import cv_folds, load_data

    _, _, comp = load_ensemble(Project(root), "digits/cv", [])
    data = load_data(Project(root), comp)
    return data, cv_folds(data)


def text(result) -> str:
    from pipelines.tune import render

    console = Console(record=True, width=250)
    render(result, console)
    return console.export_text()


def test_trials_are_scored_on_fold_0(tuned):
    root, cv, holdout, seen = tuned
    data, fold_ids = folds(root)
    fold0 = {p for p, f in zip(data.train_paths, fold_ids) if f == 0}
    trial = seen[0]
    assert set(trial.valid_paths) == fold0  # exactly fold 0's images validate
    trained = {p for p, v in zip(trial.train_paths, trial.is_valid) if not v}
    assert trained and not trained & fold0  # a fraction of the other folds trains
    assert cv.n_valid == len(fold0) and cv.cv_fold["fold"] == 0 and cv.cv_fold["folds"] == 3
    assert cv.ran == 1 and cv.trials[0].state == "complete"
    assert "scored on fold 0 of 3 (" in text(cv)


def test_the_holdout_is_another_study(tuned):
    root, cv, holdout, seen = tuned
    assert set(seen[1].valid_paths) == set(folds(root)[0].valid_paths)  # the competition's holdout
    assert (holdout.n_valid, holdout.cv_fold, holdout.ran) == (286, None, 1)
    assert holdout.study_name != cv.study_name and holdout.n_valid != cv.n_valid
    assert "scored on the holdout (286 validation images)" in text(holdout)


def test_a_fold_outside_the_cv_is_a_one_line_error(tuned):
    from pipelines.tune import tune_member

    root = tuned[0]
    with pytest.raises(EnsError, match=r"--fold 3: the competition has folds 0 to 2"):
        tune_member(Project(root), "digits/cv.yaml", "resnet", fold=3)
    with pytest.raises(EnsError, match=r"--fold needs validation: cv"):
        tune_member(Project(root), "digits/cv.yaml", "resnet", ["validation=holdout"], fold=1)
