"""`ens plan` of a cross-validated ensemble: members × fold models, each cached or to train, on its own number of
training images, estimated from the fold models already trained."""

from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from conftest import ONE_RESNET, make_project
from pipelines.config import Project
from pipelines.plan import plan_ensemble, render

pytestmark = pytest.mark.slow  # trains real fold models

CV = "validation: cv\nrefit: full\n" + ONE_RESNET


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, digits_data):
    """Folds 0 and 1 trained (fold 2 and the refit not): (project, RunResult)."""
    from pipelines.run import run_ensemble

    root = make_project(tmp_path_factory.mktemp("plan_cv") / "project", digits_data, {"cv": CV}, cv="{folds: 3}")
    return root, run_ensemble(Project(root), "digits/cv.yaml", folds=[0, 1])


@pytest.fixture(scope="module")
def memo(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flops") / "flops.json"


@pytest.fixture
def no_training(monkeypatch):
    import pipelines.train

    def refuse(*a, **k):
        raise AssertionError("ens plan trained a member")

    monkeypatch.setattr(pipelines.train, "train_member", refuse)


def fold_sizes(root: Path) -> Counter:
    from pipelines.config import load_ensemble
    from pipelines.data import cv_folds, load_data

    _, _, comp = load_ensemble(Project(root), "digits/cv", [])
    return Counter(cv_folds(load_data(Project(root), comp)))


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "cache" / "digits").iterdir())


def text(plan) -> str:
    console = Console(record=True, width=200)
    render(plan, console)
    return console.export_text()


def test_plan_shows_each_members_fold_models_cached_or_to_train(cv_run, memo, no_training):
    root, result = cv_run
    before, sizes, n = entries(root), fold_sizes(root), 1438
    plan = plan_ensemble(Project(root), "digits/cv", device="cpu", memo=memo)
    assert (plan.folds, plan.n_train, plan.n_valid) == (3, n, 0)
    trained = {(o.member.name, o.fold): o.entry for o in result.gathered.units}
    for m in plan.members:
        assert [u.fold for u in m.folds] == [0, 1, 2, "refit"]
        assert [u.cached for u in m.folds] == [True, True, False, False]
        assert [u.key for u in m.folds[:2]] == [trained[m.name, f].key for f in (0, 1)]
        # each fold model trains on the other folds' images; the refit on every one, and validates on none
        assert [u.n_train for u in m.folds] == [n - sizes[0], n - sizes[1], n - sizes[2], n]
        assert [u.n_valid for u in m.folds] == [sizes[0], sizes[1], sizes[2], 0]
        assert not m.cached and m in plan.to_train
        # the estimate, fitted on this arch's two fold models, scales with each model's training images
        fold2, refit = m.folds[2], m.folds[3]
        measured = [trained[m.name, f].meta["timings"]["train_seconds"] for f in (0, 1)]
        assert fold2.est_train_seconds == pytest.approx(sum(measured) / 2, rel=0.01)
        assert refit.est_train_seconds / fold2.est_train_seconds == pytest.approx(n / (n - sizes[2]))
        # the member's time: the sum over what is left (fold 2 and the refit), the cached folds' measured
        assert m.est_train_seconds == pytest.approx(fold2.est_train_seconds + refit.est_train_seconds)
        assert m.cached_seconds == pytest.approx(sum(u.cached_seconds for u in m.folds[:2]))
    assert plan.est_seconds == pytest.approx(sum(m.est_seconds for m in plan.members))
    out = text(plan)
    assert "2/3 folds cached, 1 to train, refit to train" in out
    assert f"{n - sizes[2]} train, {sizes[2]} valid" in out and f"{n} train" in out
    assert "0 cached, 1 to train (2 of 4 fold models to train); estimated" in out
    assert entries(root) == before  # nothing trained, nothing written


def test_without_refit_there_are_only_the_folds(cv_run, memo, no_training):
    root, _ = cv_run
    plan = plan_ensemble(Project(root), "digits/cv", ["refit=none"], device="cpu", memo=memo)
    (resnet,) = plan.members
    assert [u.fold for u in resnet.folds] == [0, 1, 2] and [u.cached for u in resnet.folds] == [True, True, False]
    assert "2/3 folds cached, 1 to train" in text(plan) and "refit" not in text(plan)
    other = plan_ensemble(Project(root), "digits/cv", ["members.resnet.lr=0.01"], device="cpu", memo=memo)
    assert [u.cached for u in other.members[0].folds] == [False] * 4  # another lr: other fold models
    assert "0/3 folds cached, 3 to train, refit to train" in text(other)
    # the same ensemble validated on the holdout: a holdout plan, no fold models
    holdout = plan_ensemble(Project(root), "digits/cv", ["refit=none", "validation=holdout"], device="cpu", memo=memo)
    assert holdout.folds is None and all(m.folds == [] for m in holdout.members)
    assert (holdout.n_train, holdout.n_valid) == (1152, 286)
