"""Learned blends and significance tests (pipelines.ensemble) on synthetic probabilities: pure numpy, no training.
The learned blends are checked against independent computations written out here."""

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipelines import ensemble
from pipelines import ensemble as blend  # the learned blends live beside the fixed ones

N, K = 500, 5


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _members(seed=0, qualities=(1.2, 1.0, 0.8, 0.5), n=N):
    """Members of falling quality with independent noise on their logits: averaging them helps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return [_softmax(rng.normal(size=(n, K)) + q * np.eye(K)[y]) for q in qualities], y


def _miscalibrated(seed=0, n=N):
    """Member 1 is the sharpest but four times overconfident and biased towards class 0; member 3 is timid."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    z = lambda q: rng.normal(size=(n, K)) + q * np.eye(K)[y]  # noqa: E731
    bias = np.array([2.0, 0, 0, 0, -1.0])
    return [_softmax(z(1.0)), _softmax(4 * z(1.2) + bias), _softmax(z(0.8)), _softmax(0.3 * z(0.8))], y


def _folds(n=N, k=5, seed=1):
    return np.random.default_rng(seed).permutation(np.arange(n) % k)  # shuffled, as a real k-fold split is


# --------------------------------------------------------------------------------------------- fixed blends
def test_power_average_rows_sum_to_one_rank_average_is_in_0_1_and_power_one_is_the_weighted_mean():
    ps, _ = _members()
    w = [3.0, 1.0, 0.5, 0.0]
    for mixed in (blend.power_average(ps, w, 2.0), blend.power_average(ps, w, 0.5), blend.power_average(ps, None, 3)):
        assert mixed.shape == (N, K) and np.allclose(mixed.sum(1), 1) and (mixed >= 0).all()
    for mixed in (blend.rank_average(ps, w), blend.rank_average(ps)):  # scores per class, rows not renormalised
        assert mixed.shape == (N, K) and (mixed >= 0).all() and (mixed <= 1).all()
    assert np.allclose(blend.power_average(ps, w, 1.0), ensemble.combine(ps, w))
    by_hand = sum(wi * p ** 2 for wi, p in zip(w, ps))
    assert np.allclose(blend.power_average(ps, w, 2.0), by_hand / by_hand.sum(1, keepdims=True))
    with pytest.raises(ValueError):
        blend.power_average(ps, w, 0)
    with pytest.raises(ValueError):
        blend.rank_average(ps, [1, -1, 1, 1])


def test_rank_average_ignores_a_monotone_transform_of_a_member():
    ps, y = _members()
    w = [2.0, 1.0, 1.0, 0.5]
    reference = blend.rank_average(ps, w)
    for transform in (lambda p: p ** 3, np.log, lambda p: 10 * p - 4):
        assert np.allclose(blend.rank_average([ps[0], transform(ps[1]), ps[2], ps[3]], w), reference)
    # the mean is not invariant: that is the point
    assert not np.allclose(ensemble.combine([ps[0], ps[1] ** 3, ps[2], ps[3]], w), ensemble.combine(ps, w))
    # by hand: per class, ranks over images scaled to [0, 1], weighted (rows not renormalised: that reorders columns)
    ranks = [np.argsort(np.argsort(p, axis=0), axis=0) / (N - 1) for p in ps]  # no ties in continuous data
    by_hand = sum(wi * r for wi, r in zip(w, ranks))
    assert np.allclose(reference, by_hand / sum(w))
    # two classes: a single member's ranks keep its AUC exactly (the rows' ranks already sum to one)
    rng = np.random.default_rng(3)
    yb = rng.integers(0, 2, N)
    pb = _softmax(rng.normal(size=(N, 2)) + np.eye(2)[yb])
    assert ensemble.roc_auc(blend.rank_average([pb]), yb) == pytest.approx(ensemble.roc_auc(pb, yb))


# --------------------------------------------------------------------------------------------- hill climbing
@pytest.mark.parametrize("metric", ["accuracy", "log_loss", "roc_auc"])
def test_hill_climb_beats_the_best_member_when_blending_helps(metric):
    ps, y = _members()
    better = 1 if ensemble.GREATER_IS_BETTER[metric] else -1
    best_single = max(better * ensemble.score(metric, p, y) for p in ps)
    w, s = blend.hill_climb(ps, y, metric)
    assert better * s > best_single + 1e-3
    assert w.sum() == pytest.approx(1) and np.count_nonzero(w) >= 2
    assert s == ensemble.score(metric, blend.clipped_blend(ps, w), y)
    w2, s2 = blend.hill_climb(ps, y, metric)
    assert np.array_equal(w, w2) and s == s2  # deterministic
    if metric == "accuracy":  # and beats the plain mean here (one fixed step of 0.05 stalls below it)
        assert s > ensemble.accuracy(ensemble.combine(ps), y)


def test_hill_climb_subtracts_a_member_that_is_the_others_noise():
    """Member A = signal + noise, C = that same noise alone (anti-correlated with A's errors' correction):
    subtracting C cleans A, which no non-negative blend can do."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, K, N)
    shared = 1.5 * rng.normal(size=(N, K))
    a = _softmax(shared + 1.5 * np.eye(K)[y] + 0.5 * rng.normal(size=(N, K)))
    b = _softmax(rng.normal(size=(N, K)) + 0.8 * np.eye(K)[y])
    c = _softmax(shared)
    for metric in ("accuracy", "log_loss"):
        w, s = blend.hill_climb([a, b, c], y, metric, allow_negative=True)
        w_pos, s_pos = blend.hill_climb([a, b, c], y, metric, allow_negative=False)
        assert w[2] < 0 and (w_pos >= 0).all()
        better = 1 if ensemble.GREATER_IS_BETTER[metric] else -1
        assert better * s > better * s_pos + (0.1 if metric == "accuracy" else 0.3)
        mixed = blend.clipped_blend([a, b, c], w)
        assert np.allclose(mixed.sum(1), 1) and mixed.min() > 0
        # the clipped blend by hand
        raw = (w[0] * a + w[1] * b + w[2] * c) / w.sum()
        raw = np.clip(raw, blend.BLEND_EPS, None)
        assert np.allclose(mixed, raw / raw.sum(1, keepdims=True))
    # non-negative weights: clipped_blend is exactly the weighted mean
    assert np.allclose(blend.clipped_blend([a, b, c], [2, 1, 0]), ensemble.combine([a, b, c], [2, 1, 0]))


# --------------------------------------------------------------------------------------------- stacking
def test_stacking_beats_the_mean_when_a_member_is_miscalibrated():
    ps, y = _miscalibrated()
    train, test = np.arange(N) < 300, np.arange(N) >= 300
    model = blend.stacking_fit([p[train] for p in ps], y[train])
    stacked = blend.stacking_predict(model, [p[test] for p in ps])
    mean = ensemble.combine([p[test] for p in ps])
    assert stacked.shape == (test.sum(), K) and np.allclose(stacked.sum(1), 1)
    assert ensemble.log_loss(stacked, y[test]) < ensemble.log_loss(mean, y[test]) - 0.05
    assert ensemble.accuracy(stacked, y[test]) >= ensemble.accuracy(mean, y[test])
    again = blend.stacking_fit([p[train] for p in ps], y[train])
    assert np.array_equal(model.coef_, again.coef_)  # deterministic
    # a class missing from the training targets: columns still line up with the classes
    keep = train & (y != 3)
    partial = blend.stacking_predict(blend.stacking_fit([p[keep] for p in ps], y[keep]), [p[test] for p in ps])
    assert partial.shape == (test.sum(), K) and (partial[:, 3] == 0).all() and np.allclose(partial.sum(1), 1)


@pytest.mark.parametrize("k, members, n, C", [(2, 3, 300, 0.5), (3, 2, 60, 10.0), (5, 4, 400, 1.0)])
def test_stacking_fits_what_scikit_learns_logistic_regression_fits(k, members, n, C):
    """ens's stacker minimises scikit-learn's objective without importing scikit-learn: the same probabilities
    (where both solvers stop at the same point), or an objective at least as low (where L-BFGS paths part)."""
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, n)
    ps = [_softmax(rng.normal(size=(n, k)) + (0.5 + m) * np.eye(k)[y]) for m in range(members)]
    x = np.concatenate([np.log(np.clip(p, blend.BLEND_EPS, 1)) for p in ps], axis=1)
    ours = blend.stacking_fit(ps, y, C)
    theirs = LogisticRegression(C=C, max_iter=5000).fit(x, y)
    assert np.abs(ours.predict_proba(x) - theirs.predict_proba(x)).max() < 1e-4
    f, _ = blend._logistic_loss(x, y, k, C)
    layout = lambda w, b: np.concatenate([w, b[:, None]], axis=1).ravel(order="F")  # noqa: E731
    assert f(layout(ours.coef_, ours.intercept_))[0] <= f(layout(theirs.coef_, theirs.intercept_))[0] + 1e-9


def test_combine_methods_import_no_scikit_learn():
    """`ens ablate` scores every combine method (stacking and rank too) on accuracy and log loss without importing
    scikit-learn or scipy.stats (each costs more than the whole ablation); it fails if a blend imports one again."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from pipelines import ensemble\nfrom pipelines.config import COMBINE_METHODS, Combine\n"
            "rng = np.random.default_rng(0); y = rng.integers(0, 3, 90)\n"
            "ps = [rng.dirichlet(np.ones(3), 90) for _ in range(3)]; folds = np.arange(90) % 5\n"
            "for metric in ('accuracy', 'log_loss'):\n"
            "    for m in COMBINE_METHODS:\n"
            "        ensemble.blend(Combine(method=m), ps, ps, y, [1, 1, 1], folds, metric)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('sklearn', 'torch') or n == 'scipy.stats'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_average_ranks_and_mcnemar_equal_scipys():
    """The two statistics ens computes without importing scipy.stats (its import costs `ens ablate` more than
    the ablation) equal scipy's: tie-averaged ranks and the exact two-sided binomial test of McNemar."""
    from scipy.stats import binomtest, rankdata

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300):
        for values in (rng.random(n), rng.integers(0, 4, n).astype(float)):
            assert np.array_equal(blend.average_ranks(values), rankdata(values))
    for n in range(1, 80):
        for k in range(n + 1):
            a = np.arange(n) < k
            assert ensemble.mcnemar_p(a, ~a) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-12, abs=1e-300)


# --------------------------------------------------------------------------------------------- nested CV
def test_nested_cv_score_equals_an_independent_loop_and_never_scores_rows_it_learned_on():
    folds = _folds()
    ps, y = _members()
    # hill climbing on accuracy, weights applied by hand
    got, per_fold = blend.nested_cv_score(ps, y, folds, blend.hill_climb_fitter("accuracy"), "accuracy")
    held_out, expected_folds = np.zeros((N, K)), []
    for k in range(5):
        tr, te = folds != k, folds == k
        w, _ = blend.hill_climb([p[tr] for p in ps], y[tr], "accuracy")
        raw = sum(wi * p[te] for wi, p in zip(w, ps)) / w.sum()
        if (w < 0).any():
            raw = np.clip(raw, blend.BLEND_EPS, None)
            raw = raw / raw.sum(1, keepdims=True)
        held_out[te] = raw
        expected_folds.append(float((raw.argmax(1) == y[te]).mean()))
    assert got == float((held_out.argmax(1) == y).mean())
    assert per_fold == expected_folds
    # stacking on log loss, the stacker called directly (it is checked against scikit-learn's above)
    ps, y = _miscalibrated()
    got, per_fold = blend.nested_cv_score(ps, y, folds, blend.stacking_fitter(C=0.5), "log_loss")
    held_out, expected_folds = np.zeros((N, K)), []
    x = np.concatenate([np.log(np.clip(p, blend.BLEND_EPS, 1)) for p in ps], axis=1)
    for k in range(5):
        tr, te = folds != k, folds == k
        held_out[te] = blend.stacking_fit([p[tr] for p in ps], y[tr], C=0.5).predict_proba(x[te])
        expected_folds.append(ensemble.log_loss(held_out[te], y[te]))
    assert got == pytest.approx(ensemble.log_loss(held_out, y), rel=1e-9)
    assert per_fold == pytest.approx(expected_folds, rel=1e-9)

    # a spy: every row is predicted exactly once, and never by a fit that saw it
    row_of = {p.tobytes(): i for i, p in enumerate(ps[0])}
    seen = []

    def spy(train_ps, train_y):
        trained = {row_of[r.tobytes()] for r in train_ps[0]}

        def predict(test_ps):
            rows = [row_of[r.tobytes()] for r in test_ps[0]]
            assert trained.isdisjoint(rows) and len(trained) + len(rows) == N
            seen.extend(rows)
            return ensemble.combine(test_ps)
        return predict

    s, _ = blend.nested_cv_score(ps, y, folds, spy, "accuracy")
    assert sorted(seen) == list(range(N)) and s == ensemble.accuracy(ensemble.combine(ps), y)


def test_nested_cv_score_is_more_honest_than_the_in_sample_score():
    folds = _folds()
    ps, y = _members()
    _, in_sample = blend.hill_climb(ps, y, "accuracy")
    nested, per_fold = blend.nested_cv_score(ps, y, folds, blend.hill_climb_fitter("accuracy"), "accuracy")
    assert nested < in_sample and len(per_fold) == 5
    ps, y = _miscalibrated()
    in_sample = ensemble.log_loss(blend.stacking_predict(blend.stacking_fit(ps, y), ps), y)
    nested, _ = blend.nested_cv_score(ps, y, folds, blend.stacking_fitter(), "log_loss")
    assert nested > in_sample  # log loss: higher is worse
    with pytest.raises(ValueError):
        blend.nested_cv_score(ps, y, np.zeros(N, dtype=int), blend.stacking_fitter(), "log_loss")


# --------------------------------------------------------------------------------------------- is it better?
def test_paired_bootstrap_covers_the_true_difference_and_is_reproducible():
    rng = np.random.default_rng(11)
    a, b = rng.random(N) < 0.8, rng.random(N) < 0.7  # true difference 0.1
    diff, low, high = blend.paired_bootstrap(a, b)
    assert diff == pytest.approx(a.mean() - b.mean()) and low < 0.1 < high and low < diff < high
    assert (diff, low, high) == blend.paired_bootstrap(a, b)  # same seed, same interval
    assert (diff, low, high) != blend.paired_bootstrap(a, b, seed=1)
    assert low > 0  # 0.1 on 500 images is real
    # coverage: the 95% interval holds the true difference in most of 40 fresh samples
    covered = 0
    for s in range(40):
        r = np.random.default_rng(100 + s)
        _, lo, hi = blend.paired_bootstrap(r.random(N) < 0.8, r.random(N) < 0.7, n_boot=500, seed=s)
        covered += lo <= 0.1 <= hi
    assert covered >= 34
    # identical members: no difference, a degenerate interval at zero
    assert blend.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def _exact_mcnemar(only_a, only_b):
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_mcnemar_p_is_one_for_identical_members_and_small_for_a_clearly_better_one():
    rng = np.random.default_rng(12)
    a = rng.random(N) < 0.7
    assert blend.mcnemar_p(a, a) == 1.0
    b = a.copy()
    flip_right, flip_wrong = np.flatnonzero(a)[:10], np.flatnonzero(~a)[:10]
    b[flip_right], b[flip_wrong] = False, True  # as many images won as lost
    assert blend.mcnemar_p(a, b) > 0.9
    better = a | (rng.random(N) < 0.5)  # right wherever a is, and on about half of a's mistakes
    p = blend.mcnemar_p(better, a)
    assert p < 1e-10 and p == pytest.approx(_exact_mcnemar(int((better & ~a).sum()), 0))
    c = rng.random(N) < 0.66
    only_a, only_c = int((a & ~c).sum()), int((~a & c).sum())
    assert blend.mcnemar_p(a, c) == pytest.approx(_exact_mcnemar(only_a, only_c))
    assert blend.mcnemar_p(a, c) == blend.mcnemar_p(c, a)  # two-sided


def test_hill_climb_never_ends_below_the_plain_mean_in_sample():
    """From the best single member alone, accuracy's plateaus can stop the climb below the plain mean (8 of 300
    such random cases did before the climb could start from the mean); now it starts from the better of the two."""
    below = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, 60)
        ps = []
        for _ in range(3):
            logits = rng.normal(size=(60, 3)) * 1.5
            logits[np.arange(60), y] += 1.0
            ps.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
        _, climbed = ensemble.hill_climb(ps, y, "accuracy", allow_negative=False)
        below += climbed < ensemble.accuracy(np.mean(ps, 0), y) - 1e-9
    assert below == 0
