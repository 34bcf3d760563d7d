"""Scores that are honest (issue 24, items 1-6): a pick made on the validation rows carries its nested-CV score,
groups stay whole in the holdout, its parts and the bootstrap, macro ROC AUC is per class over the classes present,
and distillation's options do what they say. Pure maths on synthetic numbers (fixed seeds), no training, except
the last test (classical members, marked slow)."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipelines import ensemble
from pipelines.crossval import holdout_parts
from pipelines.data import validation_mask


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _member(rng, y, k, quality=1.0):
    return _softmax(rng.normal(size=(len(y), k)) + quality * np.eye(k)[y])


# --------------------------------------------------------------------------------------------- item 1
def test_picks_made_on_the_rows_score_below_their_in_sample_score_under_nested_cv():
    """8 weak members × 300 rows: greedy selection's and the best subset's own scores flatter them; the nested-CV
    fitters (`greedy_fitter`, `subset_fitter`, what `ens ablate --pick` now records) do not."""
    gaps = {"greedy": [], "subset": []}
    for seed in range(10):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 5, 300)
        ps = [_member(rng, y, 5, 0.35) for _ in range(8)]
        folds = holdout_parts([f"img{i}" for i in range(300)], y, 42)
        in_sample = ensemble.greedy_selection(ps, y, "accuracy", 25)[1]
        nested, _ = ensemble.nested_cv_score(ps, y, folds, ensemble.greedy_fitter("accuracy", 25), "accuracy")
        gaps["greedy"].append(in_sample - nested)
        best = ensemble.subset_scores(ps, [1.0] * 8, y, "accuracy")[0]
        nested, _ = ensemble.nested_cv_score(ps, y, folds, ensemble.subset_fitter("accuracy", [1.0] * 8), "accuracy")
        gaps["subset"].append(best[1] - nested)
    assert np.mean(gaps["greedy"]) > 0.03 and np.mean(gaps["subset"]) > 0.01
    # the subset fitter blends exactly the subset it picks, with the members' weights
    predict = ensemble.subset_fitter("accuracy", [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])(ps, y)
    chosen = list(ensemble.subset_scores(ps, [1.0, 2.0] + [1.0] * 6, y, "accuracy")[0][0])
    w = np.array([1.0, 2.0] + [1.0] * 6)
    assert np.allclose(predict(ps), sum(w[i] * ps[i] for i in chosen) / w[chosen].sum())


# --------------------------------------------------------------------------------------------- item 2
def _patients(n_patients=100, per=10, seed=0):
    rng = np.random.default_rng(seed)
    groups = [f"patient{g:03d}" for g in range(n_patients) for _ in range(per)]
    labels = [str(c) for c in np.repeat(rng.integers(0, 3, n_patients), per)]  # a patient's images share a class
    paths = [f"train/img{i:05d}.png" for i in range(len(groups))]
    return paths, labels, groups


@pytest.mark.parametrize("stratified", [True, False])
def test_the_holdout_keeps_whole_groups_on_one_side(stratified):
    paths, labels, groups = _patients()
    # without groups (as before) nearly every validation patient also trains: the leak the fix closes
    plain = validation_mask(paths, labels, 0.2, 42, stratified)
    straddle = {g for g, v in zip(groups, plain) if v} & {g for g, v in zip(groups, plain) if not v}
    assert len(straddle) > 50
    valid = validation_mask(paths, labels, 0.2, 42, stratified, groups)
    assert valid == validation_mask(paths, labels, 0.2, 42, stratified, groups)  # fixed
    validated, trained = ({g for g, v in zip(groups, valid) if v == side} for side in (True, False))
    assert not validated & trained
    assert len(validated) == 20  # 20% of the images, in whole patients
    if stratified:  # each class keeps its share as far as whole patients allow
        for c in set(labels):
            share = np.mean([v for v, l in zip(valid, labels) if l == c])
            assert abs(share - 0.2) <= 10 / sum(l == c for l in labels) / 2 + 1e-9
    assert valid != validation_mask(paths, labels, 0.2, 7, stratified, groups)  # the seed moves it


def test_holdout_parts_keep_whole_groups_in_one_part():
    paths, labels, groups = _patients(30, 10)
    parts = holdout_parts(paths, labels, 42, groups=groups)
    assert len(set(parts)) == 5
    for g in set(groups):
        assert len({p for p, h in zip(parts, groups) if h == g}) == 1
    assert len(set(holdout_parts(paths[:30], labels[:30], 42, groups=groups[:30]))) == 3  # three groups, 3 parts
    plain = holdout_parts(paths, labels, 42)  # without groups: patients straddle parts
    assert any(len({p for p, h in zip(plain, groups) if h == g}) > 1 for g in set(groups))


# --------------------------------------------------------------------------------------------- item 3
def _equally_good(seed, n_groups=40, per=15):
    """Two models exactly as good on average, whose hits are correlated within each group (each model has its
    own accuracy per group, drawn from one distribution)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per)
    qa, qb = rng.beta(2, 1, n_groups), rng.beta(2, 1, n_groups)
    return rng.random(len(groups)) < qa[groups], rng.random(len(groups)) < qb[groups], groups


def test_the_group_bootstrap_and_clustered_mcnemar_hold_their_level():
    """At a nominal 5% level over 200 seeds: resampling images excludes 0 in about 37% of runs, McNemar's exact
    test rejects as often; drawing whole groups (clustered McNemar) stays near 5%."""
    runs = 200
    by_image = by_group = mcnemar_image = mcnemar_group = 0
    for seed in range(runs):
        a, b, groups = _equally_good(seed)
        _, low, high = ensemble.paired_bootstrap(a, b, 1000, seed)
        by_image += not low <= 0 <= high
        _, low, high = ensemble.paired_bootstrap(a, b, 1000, seed, groups=groups)
        by_group += not low <= 0 <= high
        mcnemar_image += ensemble.mcnemar_p(a, b) < 0.05
        mcnemar_group += ensemble.mcnemar_p(a, b, groups) < 0.05
    assert by_image / runs > 0.25 and mcnemar_image / runs > 0.25
    assert by_group / runs <= 0.10 and mcnemar_group / runs <= 0.10


def test_the_group_bootstrap_of_any_metric_draws_whole_groups():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    pa, pb = _member(rng, y, 3), _member(rng, y, 3)
    groups = np.repeat([f"g{i:02d}" for i in range(12)], 10)  # in sorted order: code j is group j
    # one image per group is the image bootstrap, draw for draw
    singles = [f"s{i:03d}" for i in range(120)]  # in sorted order: group j is image j
    for metric in ("accuracy", "log_loss", "roc_auc", "f1_macro"):
        assert tuple(ensemble.paired_bootstrap_metric(metric, pa, pb, y, 200, groups=singles)) == pytest.approx(
            tuple(ensemble.paired_bootstrap_metric(metric, pa, pb, y, 200)))
    # a metric recomputed per resample: each resample holds whole groups, as drawn (the same generator, by hand)
    got = ensemble.paired_bootstrap_metric("roc_auc", pa, pb, y, 200, seed=3, groups=groups)
    draws = np.random.default_rng(3)
    codes = np.repeat(np.arange(12), 10)
    diffs = []
    for _ in range(200):
        idx = np.concatenate([np.flatnonzero(codes == j) for j in draws.integers(0, 12, 12)])
        diffs.append(ensemble.roc_auc(pa[idx], y[idx]) - ensemble.roc_auc(pb[idx], y[idx]))
    assert tuple(got[1:]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    # the clustered McNemar test by hand (Durkalski et al. 2003)
    a, b = pa.argmax(1) == y, pb.argmax(1) == y
    per_group = np.array([(a & ~b)[codes == j].sum() - (~a & b)[codes == j].sum() for j in range(12)])
    from scipy.stats import chi2

    assert ensemble.mcnemar_p(a, b, groups) == pytest.approx(chi2.sf(per_group.sum() ** 2 / (per_group ** 2).sum(), 1))


# --------------------------------------------------------------------------------------------- items 4 and 5
def test_macro_auc_is_the_mean_of_per_class_binary_aucs_over_the_classes_present():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    p = _member(rng, y, 4, 0.8)
    per_class = [roc_auc_score(y == c, p[:, c]) for c in range(4)]
    assert ensemble.roc_auc(p, y) == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert ensemble.roc_auc(p, y) == pytest.approx(np.mean(per_class))
    # rows need not sum to one: each column's order is all that counts
    scaled = p * rng.uniform(0.1, 5, size=(400, 1))
    assert ensemble.roc_auc(scaled, y) == pytest.approx(np.mean([roc_auc_score(y == c, scaled[:, c]) for c in range(4)]))
    # a class absent from the targets (a fold, a bootstrap sample): the mean over the classes present, not NaN
    some = y != 2
    assert ensemble.roc_auc(p[some], y[some]) == pytest.approx(
        np.mean([roc_auc_score(y[some] == c, p[some, c]) for c in (0, 1, 3)]))
    assert np.isnan(ensemble.roc_auc(p[y == 1], y[y == 1]))  # one class: no AUC at all
    # ties count half, as sklearn's
    coarse = np.round(p, 1)
    assert ensemble.roc_auc(coarse, y) == pytest.approx(np.mean([roc_auc_score(y == c, coarse[:, c]) for c in range(4)]))


def test_ranking_a_single_member_keeps_its_macro_auc():
    """Rank blending no longer renormalises rows (which reordered each class's column: the AUC dropped)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = _member(rng, y, 5)
    ranked = ensemble.rank_average([p])
    assert ensemble.roc_auc(ranked, y) == pytest.approx(ensemble.roc_auc(p, y))
    renormalised = ranked / ranked.sum(1, keepdims=True)  # what the blend did before
    assert ensemble.roc_auc(renormalised, y) < ensemble.roc_auc(p, y) - 0.003
    assert (ranked.argmax(1) == renormalised.argmax(1)).all()  # the argmax never depended on it


def test_the_bootstrap_says_how_many_resamples_lacked_a_class():
    rng = np.random.default_rng(2)
    y = np.r_[rng.integers(0, 3, 98), [3, 3]]  # class 3: two images, absent from ~13% of resamples
    pa, pb = _member(rng, y, 4), _member(rng, y, 4)
    got = ensemble.paired_bootstrap_metric("roc_auc", pa, pb, y, 500, seed=5)
    draws = np.random.default_rng(5)
    expected = sum(len(np.unique(y[draws.integers(0, 100, 100)])) < 4 for _ in range(500))
    assert got.lacking == expected and 20 < expected < 120 and got.dropped == 0
    assert np.isfinite(got[1]) and np.isfinite(got[2])
    # two classes, one rare: a resample without it has no AUC at all; it is counted, and left out
    yb = np.r_[np.zeros(97, int), [1, 1, 1]]
    qa, qb = _member(rng, yb, 2), _member(rng, yb, 2)
    got = ensemble.paired_bootstrap_metric("roc_auc", qa, qb, yb, 500, seed=5)
    assert got.dropped == got.lacking > 0


# --------------------------------------------------------------------------------------------- item 6
def test_distillation_smooths_its_soft_targets_as_label_smoothing_does():
    import torch
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat

    from pipelines.config import Member
    from pipelines.train.recipe import distill_loss

    torch.manual_seed(0)
    pred, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    one_hot = torch.cat([torch.eye(5)[labels], torch.ones(16, 1)], 1)
    base = dict(name="m", arch="test_resnet", pretrained=False, decode=True, distill={"teacher": "digits/final.yaml"})
    losses = {}
    for eps in (0.0, 0.1, 0.3):
        member = Member(**base, loss={"label_smoothing": eps})
        loss = distill_loss(member, LabelSmoothingCrossEntropyFlat(eps=eps) if eps else CrossEntropyLossFlat())
        losses[eps] = float(loss(pred, one_hot))
        reference = LabelSmoothingCrossEntropyFlat(eps=eps)(pred, labels) if eps else CrossEntropyLossFlat()(pred, labels)
        assert losses[eps] == pytest.approx(float(reference), rel=1e-5)  # labelled rows train as without distill
        assert float(loss(pred, labels)) == pytest.approx(float(reference), rel=1e-5)  # validation: the base loss
    assert len(set(losses.values())) == 3  # another smoothing, another loss (before: the same)


def test_distill_on_a_classical_member_is_refused():
    from pipelines.config import Member

    with pytest.raises(ValueError, match="distill trains a network on soft targets"):
        Member(name="m", arch="classical:em_traces/logistic", decode=True, distill={"teacher": "digits/final.yaml"})


# --------------------------------------------------------------------------------------------- items 1-3 end to end
CLASSICAL = """\
competition: digits
defaults: {pretrained: false, size: 32, num_workers: 0, tta: {n: 0}}
members:
  - {name: traces, arch: "classical:em_traces/logistic"}
  - {name: svc, arch: "classical:em_traces/svc"}
  - {name: forest, arch: "classical:em_traces+color_hist/random_forest"}
  - {name: hist, arch: "classical:color_hist/logistic"}
"""


@pytest.mark.slow
def test_ablate_on_grouped_images_keeps_groups_whole_and_records_nested_scores(tmp_path, digits_data):
    """Digits written by 40 writers (cv.group_column): the holdout, its nested-CV parts and the bootstrap keep
    writers whole, and `ens ablate --pick greedy|subset --write --submit` records the nested-CV score of the pick
    in the YAML's header, the validation JSON and history.csv (before: the in-sample score of the picked mean)."""
    import csv

    import pandas as pd
    import yaml

    from conftest import ens, make_project
    from pipelines.ablate import ablate
    from pipelines.config import Project, load_competition, load_ensemble
    from pipelines.data import load_data

    names = sorted(p.name for p in (digits_data / "train_images").glob("*/*.png"))
    writers = {n: f"w{i % 40:02d}" for i, n in enumerate(names)}
    pd.DataFrame({"image_id": list(writers), "writer": list(writers.values())}).to_csv(tmp_path / "w.csv", index=False)
    root = make_project(tmp_path / "p", digits_data, {"classic": CLASSICAL},
                        cv=f"{{folds: 5, group_column: writer, groups_csv: {tmp_path / 'w.csv'}}}")
    project = Project(root)
    data = load_data(project, load_competition(project, "digits"))
    side = {}
    for path, valid in zip(data.train_paths, data.is_valid):
        side.setdefault(writers[path.split("/")[-1]], set()).add(valid)
    assert all(len(s) == 1 for s in side.values()) and 0.15 < np.mean(data.is_valid) < 0.25

    out = ens("ablate", "digits/classic.yaml", "--write", "ensembles/digits/greedy.yaml", "--submit", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "whole groups (8 writers" in out.stdout.replace("\n", " ")  # 8 writers validate
    r = ablate(project, "digits/classic.yaml", cached_only=True)
    y = r.outcomes[0].entry.arrays["valid_targets"]
    p = [o.entry.arrays["valid_plain"].astype("float64") for o in r.outcomes]
    groups = np.array([writers[str(i).split("/")[-1]] for i in r.outcomes[0].entry.arrays["valid_ids"]])
    folds = r.gathered.blend_folds()
    assert all(len(set(folds[groups == g])) == 1 for g in set(groups)) and len(set(folds)) == 5
    full = ensemble.combine(p)
    for row, q in zip(r.members, p):
        assert tuple(row.alone_interval) == ensemble.paired_bootstrap(q.argmax(1) == y, full.argmax(1) == y, 1000,
                                                                      groups=groups)
        assert row.alone_p == pytest.approx(ensemble.mcnemar_p(q.argmax(1) == y, full.argmax(1) == y, groups))

    def recorded(stem):
        csv_path = next((root / "submissions/digits").glob(f"*-classic-{stem}.csv"))
        validation = json.loads(csv_path.with_suffix(".validation.json").read_text())
        with open(root / "submissions/digits/history.csv") as f:
            history = [row for row in csv.DictReader(f) if row["file"].endswith(csv_path.name)]
        return validation, float(history[0]["valid_score"])

    greedy, _ = ensemble.nested_cv_score(p, y, folds, ensemble.greedy_fitter("accuracy", 100), "accuracy")
    written = yaml.safe_load((root / "ensembles/digits/greedy.yaml").read_text())
    assert written["combine"] == "greedy" and len(written["members"]) == 4  # the ensemble's rounds (100)
    header = (root / "ensembles/digits/greedy.yaml").read_text().splitlines()[0]
    assert f"{greedy:.4f} (nested cross-validation)" in header
    validation, history = recorded("greedy")
    assert validation["score"] == pytest.approx(greedy) and history == pytest.approx(greedy, abs=1e-6)
    assert validation["honest"] == "nested cross-validation" and validation["in_sample"] == pytest.approx(r.greedy_score)
    _, e, _ = load_ensemble(project, "digits/greedy.yaml")
    assert e.combine.method == "greedy"  # `ens run` of the written YAML scores it the same way

    out = ens("ablate", "digits/classic.yaml", "--cached-only", "--pick", "subset", "--write",
              "ensembles/digits/subset.yaml", "--submit", cwd=root)
    assert out.returncode == 0, out.stderr
    subset, _ = ensemble.nested_cv_score(p, y, folds, ensemble.subset_fitter("accuracy", [1.0] * 4), "accuracy")
    assert f"{subset:.4f} (nested cross-validation)" in (root / "ensembles/digits/subset.yaml").read_text()
    validation, history = recorded("subset")
    assert validation["score"] == pytest.approx(subset) and history == pytest.approx(subset, abs=1e-6)
    assert validation["honest"] == "nested cross-validation"
    # written as `combine: subset` over every member: `ens run` of it picks again on the rows and records the
    # nested-CV score too (a review ran the subset's members as a plain mean: their best-of-subsets score recorded)
    _, e, _ = load_ensemble(project, "digits/subset.yaml")
    assert e.combine.method == "subset" and len(e.members) == 4
    run = ens("run", "digits/subset.yaml", "--no-submit", cwd=root)
    assert run.returncode == 0, run.stderr
    ran = next(c for c in (root / "submissions/digits").glob("*-subset.csv") if "classic" not in c.name)
    validation = json.loads(ran.with_suffix(".validation.json").read_text())
    assert validation["score"] == pytest.approx(subset) and validation["honest"] == "nested cross-validation"


def test_clustered_mcnemar_is_one_when_every_groups_discordant_images_cancel():
    """A review found p = nan (0/0): each group has one image only A gets right and one only B does."""
    p = ensemble.mcnemar_p([1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0], ["x", "x", "y", "y", "z", "z"])
    assert p == 1.0
