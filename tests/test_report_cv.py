"""`ens report` of a cross-validated ensemble (`validation: cv`): two tiny members, 3 folds and a refit, trained
once (~25 s). The report must speak of out-of-fold (OOF) rows, draw one curve per fold model, give each member's
per-fold mean ± std, score the ensemble as its `combine:` (hill climbing) does — checked against an independent
nested cross-validation of the cached entries and against what `ens run` recorded — and name members whose fold
models are missing. The page is opened in headless Chromium as tests/test_report.py does."""

import html
import json
import re
import shutil

import numpy as np
import pytest

from conftest import copy_project, make_project
from pipelines import ensemble
from pipelines.config import Project
from pipelines.report import SECTIONS, build_report
from pipelines.run import gather_members, run_ensemble
from test_report import CHECK_SCRIPT, _browse, _console, chromium  # noqa: F401 (chromium: a fixture)

pytestmark = pytest.mark.slow  # trains real fold models

CV = """\
competition: digits
validation: cv
refit: full
combine: hill_climb
defaults:
  pretrained: false
  size: 16
  epochs: 1
  lr: 0.005
  batch_size: 64
  num_workers: 0
  aug_transforms: {do_flip: false, max_rotate: 10}
  tta: {n: 1}
members:
  - {name: effnet, arch: test_efficientnet}
  - {name: resnet, arch: test_resnet}
"""
FOLDS = 3


@pytest.fixture(scope="module")
def cv_report(tmp_path_factory, digits_data):
    """(project root, report text, Gathered, RunResult): trained and submitted once by `ens run`, then reported."""
    root = make_project(tmp_path_factory.mktemp("cv") / "project", digits_data, {"cv": CV}, cv=f"{{folds: {FOLDS}}}")
    run = run_ensemble(Project(root), "digits/cv.yaml")
    path = build_report(Project(root), "digits/cv.yaml")
    g = gather_members(Project(root), "digits/cv.yaml", cached_only=True)
    return root, path.read_text(), g, run


def _section(text: str, key: str) -> str:
    return re.search(rf'<section id="{key}">(.*?)</section>', text, re.S).group(1)


def _row(text: str, name: str) -> str:
    return re.search(rf"<tr[^>]*><td class=l>{name}</td>(.*?)</tr>", text).group(1)


def test_cv_report_speaks_of_out_of_fold_rows(cv_report):
    _, text, g, _ = cv_report
    n = len(g.data.train_paths)
    assert n == len(g.outcomes[0].entry.arrays["valid_ids"]) > 1000  # every training image, not the holdout's
    assert f"out-of-fold (OOF) over {n} training images, {FOLDS} folds" in text.split("</header>")[0]
    glance = _section(text, "glance")
    assert f"out-of-fold (OOF) accuracy over {n} training images, {FOLDS} folds" in glance
    assert f"one image is {1 / n:.4f}" in glance
    assert "Test predictions: the refit model" in glance
    assert f"On the out-of-fold (OOF) predictions of {n} training images ({FOLDS} folds)" in _section(text, "classes")
    assert "Most confidently wrong out-of-fold images" in text
    assert "validation images" not in text and "holdout" not in text


def test_cv_report_draws_one_curve_per_fold_model(cv_report):
    _, text, g, _ = cv_report
    curves = _section(text, "curves")
    assert "no per-epoch history" not in curves
    for o in g.outcomes:
        units = o.entry.meta["units"]
        assert [u["fold"] for u in units] == [0, 1, 2, "refit"] and o.entry.meta["history"] == []
        alt = f"training curves of {o.member.name}, one line per fold model: fold 0, fold 1, fold 2, refit"
        assert f'alt="{alt}" src="data:image/png;base64,' in curves
        for u in units[:FOLDS]:  # each fold model's last epoch, as it recorded it
            assert f"fold {u['fold']}: train_loss {u['history'][-1]['train_loss']:.4f}" in curves
        assert f"refit: train_loss {units[-1]['history'][-1]['train_loss']:.4f}</p>" in curves  # no valid loss


def test_cv_members_show_oof_score_and_fold_spread(cv_report):
    _, text, g, _ = cv_report
    glance = _section(text, "glance")
    assert "per fold tta accuracy, mean ± std" in glance
    for o in g.outcomes:
        a = o.entry.arrays
        oof = ensemble.accuracy(a["valid_tta"], a["valid_targets"])
        per_fold = [ensemble.accuracy(a["valid_tta"][a["valid_folds"] == k], a["valid_targets"][a["valid_folds"] == k])
                    for k in range(FOLDS)]
        # the fold models' own entries hold exactly their fold's rows: the same scores
        own = [ensemble.accuracy(f.entry.arrays["valid_tta"], f.entry.arrays["valid_targets"]) for f in o.folds[:FOLDS]]
        assert np.allclose(per_fold, own)
        cells = re.findall(r"<td>([^<]*)</td>", _row(glance, o.member.name))
        assert f"{oof:.4f}" in cells
        assert f"{np.mean(per_fold):.4f} ± {np.std(per_fold):.4f}" in cells


def test_cv_ensemble_score_is_the_nested_cv_of_its_blend(cv_report):
    _, text, g, run = cv_report
    probs = [o.entry.probs("valid", "tta") for o in g.outcomes]
    targets, folds = g.outcomes[0].entry.arrays["valid_targets"], g.outcomes[0].entry.arrays["valid_folds"]
    honest, per_fold = ensemble.nested_cv_score(probs, targets, folds, ensemble.hill_climb_fitter("accuracy"),
                                                "accuracy")
    _, in_sample = ensemble.hill_climb(probs, targets, "accuracy")
    glance = _section(text, "glance")
    assert f"hill_climb blend): <b>{honest:.4f}</b> by nested cross-validation" in glance
    assert f"in-sample {in_sample:.4f}" in glance
    assert f"Per fold: {np.mean(per_fold):.4f} ± {np.std(per_fold):.4f}" in glance
    assert run.valid_score == pytest.approx(honest)  # what `ens run` recorded for the submission
    assert "hill_climb (nested CV)" in _row(glance, "ensemble")


def test_cv_confusion_and_mistakes_are_on_oof_rows(cv_report):
    _, text, g, _ = cv_report
    n = len(g.data.train_paths)
    classes = _section(text, "classes")
    assert classes.count("<td class=l>macro</td>") == 3  # ensemble and both members
    # the learned blend's confusion is its honest one: each row blended by weights learned without that row
    probs = [o.entry.probs("valid", "tta") for o in g.outcomes]
    targets, folds = g.outcomes[0].entry.arrays["valid_targets"], g.outcomes[0].entry.arrays["valid_folds"]
    honest, _, _ = ensemble.nested_cv(probs, targets, folds, ensemble.hill_climb_fitter("accuracy"), "accuracy")
    assert f"ensemble (hill_climb, nested CV) <span class=\"note\">accuracy {honest:.4f}" in classes
    assert len(re.findall(rf"<td class=l>macro</td>(?:<td>[^<]*</td>){{3}}<td>{n}</td>", classes)) == 3
    for o in g.outcomes:
        acc = ensemble.accuracy(o.entry.probs("valid", "tta"), o.entry.arrays["valid_targets"])
        assert f"{o.member.name} <span class=\"note\">accuracy {acc:.4f}" in classes
    mistakes = _section(text, "mistakes")
    assert f" of {n} training images (out of fold) are wrong" in mistakes
    shown = re.findall(r'<figure title="([^"]*)"><img alt="[^"]*" src="data:image/png;base64,', mistakes)
    assert shown and all(p.startswith("train_images/") for p in shown)  # training paths, thumbnails read
    assert "image unreadable" not in mistakes
    assert re.search(r"digit_\d+\.png · fold [0-2]<br>", mistakes)


def test_cv_members_with_missing_folds_are_left_out(cv_report, tmp_path):
    root, _, g, _ = cv_report
    copy = copy_project(root, tmp_path / "p")
    resnet = next(o for o in g.outcomes if o.member.name == "resnet")
    shutil.rmtree(copy / "cache" / "digits" / resnet.entry.meta["units"][1]["key"])  # fold 1's entry
    dest = build_report(Project(copy), "digits/cv.yaml", cached_only=True, dest=tmp_path / "r.html")
    text = dest.read_text()
    assert "Left out: folds missing (--cached-only): resnet (fold 1)" in text
    assert "training curves of resnet" not in text and "training curves of effnet" in text


def test_cv_report_opens_in_headless_chromium(cv_report, chromium, tmp_path):
    root, text, _, _ = cv_report
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace('<meta http-equiv="Content-Security-Policy"',
                                    CHECK_SCRIPT + '<meta http-equiv="Content-Security-Policy"', 1))
    done = _browse(chromium, tmp_path, "--dump-dom", "--window-size=1280,4000", checked.as_uri())
    found = re.search(r'data-check="([^"]*)"', done.stdout)
    assert found, "the page's load event never fired: " + done.stderr[-2000:]
    check = json.loads(html.unescape(found.group(1)))
    assert check["errors"] == [] and not _console(done.stderr), (check["errors"], _console(done.stderr))
    assert list(check["sections"]) == list(SECTIONS)
    assert check["sections"]["curves"]["images"] == 2 and check["sections"]["mistakes"]["images"] > 0
    assert check["decoded"] == check["images"] > 0
    assert check["width"] <= 1280, "the page scrolls sideways"
