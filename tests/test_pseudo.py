"""Pseudo-labels (`pseudo: {teacher, threshold | top}`): a member trains on its images plus exactly the teacher's
confident test images, labelled with the teacher's class; in cv each fold takes the teacher's own fold's test
predictions (never models that saw its validation images); a changed teacher retrains the student."""

import numpy as np
import pytest

from conftest import ONE_RESNET, ens, make_project
from pipelines.config import Project, load_ensemble
from pipelines.errors import EnsError

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

STUDENT = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 1, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 0},
           aug_transforms: null}
members:
  - {name: student, arch: test_resnet, pseudo: {teacher: digits/teacher.yaml, RULE}}
"""
TEACHER = ONE_RESNET.replace("tta: {n: 0}", "tta: {n: 0}\n  epochs: 2")


def _data(root, fold=None, name="student"):
    from pipelines.data import cv_folds, fold_data, load_data
    from pipelines.run import member_data

    project = Project(root)
    _, ens, comp = load_ensemble(project, f"digits/{name}.yaml")
    data = load_data(project, comp)
    if fold is not None:
        data = fold_data(data, cv_folds(data), fold)
    return data, member_data(project, ens.members[0], data, fold)


def test_the_confident_test_images_join_with_the_teachers_labels(tmp_path, digits_data):
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"teacher": TEACHER,
                                                      "student": STUDENT.replace("RULE", "threshold: 0.6")})
    with pytest.raises(EnsError, match="teacher ensembles/digits/teacher.yaml is not fully cached.*ens run"):
        _data(root)
    teacher = run_ensemble(Project(root), "digits/teacher.yaml", submit=False)
    probs = teacher.members[0].entry.arrays["test_tta"]
    base, data = _data(root)
    confident = np.flatnonzero(probs.max(1) >= 0.6)
    assert 0 < len(confident) < len(probs)
    added = list(zip(data.train_paths[len(base.train_paths):], data.train_labels[len(base.train_labels):]))
    assert added == [(base.test_paths[i], base.vocab[probs[i].argmax()]) for i in confident]
    assert data.valid_paths == base.valid_paths and data.fingerprint != base.fingerprint
    student = run_ensemble(Project(root), "digits/student.yaml", submit=False).members[0]
    assert student.how == "trained" and student.entry.meta["pseudo_labels"] == len(confident)

    # top: the most confident share of each predicted class
    (root / "ensembles/digits/top.yaml").write_text(STUDENT.replace("RULE", "top: 0.25"))
    _, top = _data(root, name="top")
    labels = top.train_labels[len(base.train_labels):]
    predicted = probs.argmax(1)
    for c in np.unique(predicted):
        assert labels.count(base.vocab[c]) == max(1, round((predicted == c).sum() * 0.25))

    # another teacher (other weights, other labels) retrains the student
    (root / "ensembles/digits/teacher.yaml").write_text(TEACHER.replace("lr: 0.005", "lr: 0.02"))
    run_ensemble(Project(root), "digits/teacher.yaml", submit=False)
    _, again = _data(root)
    assert again.fingerprint != data.fingerprint


def test_in_cv_each_fold_learns_from_the_teachers_same_fold(tmp_path, digits_data):
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {
        "teacher": "validation: cv\n" + TEACHER,
        "student": "validation: cv\n" + STUDENT.replace("RULE", "threshold: 0.5"),
        "holdout": STUDENT.replace("RULE", "threshold: 0.5")}, cv="{folds: 3}")
    teacher = run_ensemble(Project(root), "digits/teacher.yaml", submit=False).members[0]
    units = {u.fold: u.entry.arrays["test_tta"] for u in teacher.folds}
    for fold in range(3):
        base, data = _data(root, fold)
        mine = np.flatnonzero(units[fold].max(1) >= 0.5)
        added = data.train_paths[len(base.train_paths):]
        assert added == [base.test_paths[i] for i in mine]  # the fold's own teacher model, not the fold mean
        assert data.train_labels[len(base.train_labels):] == [base.vocab[units[fold][i].argmax()] for i in mine]
    mean = np.mean([units[f] for f in range(3)], axis=0)
    assert any(list(np.flatnonzero(units[f].max(1) >= 0.5)) != list(np.flatnonzero(mean.max(1) >= 0.5))
               for f in range(3))  # so the test above tells the two apart
    with pytest.raises(EnsError, match="a holdout member needs a holdout teacher"):
        _data(root, name="holdout")


DISTILLED = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 1, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 0},
           aug_transforms: null, decode: true}
members:
  - {name: student, arch: test_resnet, distill: {teacher: digits/teacher.yaml, weight: 0.5, temperature: 2}}
"""


def test_a_distilled_students_loss_uses_the_teachers_probabilities(tmp_path, digits_data):
    import torch
    from fastai.callback.core import Callback

    from pipelines.run import run_ensemble
    from pipelines.train import train_member

    root = make_project(tmp_path / "p", digits_data, {"teacher": TEACHER, "student": DISTILLED})
    teacher = run_ensemble(Project(root), "digits/teacher.yaml", submit=False).members[0].entry.arrays["test_tta"]
    base, data = _data(root)
    tempered = teacher.astype("float64") ** 0.5
    tempered /= tempered.sum(1, keepdims=True)
    targets, weights = data.soft_targets
    n = len(base.train_paths)
    assert data.train_paths[n:] == base.test_paths  # every test image joins...
    assert np.allclose(targets[n:], tempered, atol=1e-6) and (weights[n:] == 0.5).all()  # ...with the teacher's
    assert (targets[:n].max(1) == 1).all() and (weights[:n] == 1).all()  # the labelled images keep their labels

    class LossSpy(Callback):
        order = 99

        def __init__(self):
            self.seen = []

        def after_loss(self):
            if self.training:
                self.seen.append((self.pred.detach().float(), self.yb[0].detach(), float(self.loss)))

    spy = LossSpy()
    member = load_ensemble(Project(root), "digits/student.yaml")[1].members[0]
    train_member(member, data, cbs=[spy])
    pred, y, loss = next(s for s in spy.seen if (s[1][:, -1] == 0.5).any())  # a batch holding test images
    ce = -(y[:, :-1] * torch.log_softmax(pred, 1)).sum(1)
    assert loss == pytest.approx(float((y[:, -1] * ce).sum() / y[:, -1].sum()), rel=1e-5)
    soft_rows = y[y[:, -1] == 0.5, :-1].numpy()
    assert all(np.abs(tempered - row).max(1).min() < 1e-6 for row in soft_rows)  # each a teacher row

    # `ens bench` times the student beside its teacher
    run_ensemble(Project(root), "digits/student.yaml", submit=False)
    out = ens("bench", "digits/student.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "student learnt from digits/teacher.yaml" in out.stdout and "× faster" in out.stdout


def test_distill_is_validated():
    from pipelines.config import Member

    base = dict(name="m", arch="test_resnet", pretrained=False, distill={"teacher": "digits/final.yaml"})
    with pytest.raises(ValueError, match="distill needs decode: true"):
        Member(**base)
    with pytest.raises(ValueError, match="does not combine with mixup"):
        Member(**base, decode=True, mixup={})
