"""Combining members' probabilities and scoring them with the competition's metric. Pure numpy (scikit-learn for
the metrics it already does well): ablation and selection will call these thousands of times.

Below the fixed blends: blends whose weights are learned from out-of-fold (OOF) probabilities (hill climbing,
stacking), their honest score (`nested_cv_score`: a blend learned on the rows it is scored on flatters itself),
and the statistics that say whether one ensemble really beats another (paired bootstrap, McNemar). Last, `blend`:
an ensemble's `combine:` applied to its members, with the score to trust."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

EPS = 1e-15


def combine(probs: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """The (weighted) mean of the members' probabilities; rows still sum to one."""
    if not probs:
        raise ValueError("nothing to combine")
    w = np.asarray(weights if weights is not None else [1.0] * len(probs), dtype="float64")
    if w.sum() <= 0:
        raise ValueError("member weights must not all be zero")
    return np.tensordot(w / w.sum(), np.stack(probs).astype("float64"), axes=1)


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float((probs.argmax(1) == targets).mean())


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Cross-entropy with probabilities clipped, as Kaggle computes it (rows renormalised after clipping)."""
    p = np.clip(probs, EPS, 1 - EPS)
    p = p / p.sum(1, keepdims=True)
    return float(-np.log(p[np.arange(len(targets)), targets]).mean())


def f1_macro(probs: np.ndarray, targets: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(targets, probs.argmax(1), average="macro", labels=np.arange(probs.shape[1])))


def roc_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """Two classes: the AUC of the second class's column. More: the macro mean of each class's one-vs-rest binary
    AUC, over the classes present in `targets` (a fold or a bootstrap sample may lack one; sklearn's `ovr` then
    gives NaN). Only each column's order matters: rows need not sum to one (rank blends, scores). NaN when the
    targets hold a single class. The Mann-Whitney form of the AUC (ties count half), as sklearn computes it, for
    every class at once: ablation scores thousands of resamples."""
    probs, targets = np.asarray(probs, dtype="float64"), np.asarray(targets)
    present = np.unique(targets)
    if len(present) < 2:
        return float("nan")
    cols = [1] if probs.shape[1] == 2 else present
    ranks = np.apply_along_axis(average_ranks, 0, probs[:, cols])  # ties share their average rank
    positive = targets[:, None] == np.asarray(cols)[None, :]
    n_pos = positive.sum(0).astype("float64")
    n_neg = len(targets) - n_pos
    auc = ((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(auc.mean())


METRICS = {"accuracy": accuracy, "log_loss": log_loss, "f1_macro": f1_macro, "roc_auc": roc_auc}
GREATER_IS_BETTER = {"accuracy": True, "log_loss": False, "f1_macro": True, "roc_auc": True}


def per_class(probs: np.ndarray, targets: np.ndarray, vocab: list[str]) -> dict:
    """Precision, recall, F1 and support per class, and the confusion matrix (rows: true, columns: predicted) —
    what the seeds report for every model. Plain numpy: it runs on every member and every ensemble."""
    n = len(vocab)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (targets, probs.argmax(1)), 1)
    hits = np.diag(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(hits / confusion.sum(0))
        recall = np.nan_to_num(hits / confusion.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"classes": list(vocab), "precision": precision.round(6).tolist(), "recall": recall.round(6).tolist(),
            "f1": f1.round(6).tolist(), "support": confusion.sum(1).tolist(), "confusion": confusion.tolist()}


def score(metric: str, probs: np.ndarray, targets: np.ndarray) -> float:
    return METRICS[metric](probs, targets)


# --------------------------------------------------------------------------------------------- ablation
def _better(metric: str):
    """A sort key for (score, log loss): higher is better; log loss breaks accuracy's frequent ties."""
    sign = 1.0 if GREATER_IS_BETTER[metric] else -1.0
    return lambda s, ll: (sign * s, -ll)


def changed(reference: np.ndarray, other: np.ndarray, targets: np.ndarray) -> tuple[int, int, int]:
    """How many validation images change their predicted label from `reference` to `other`: (changed, of those
    now right, of those now wrong). A score difference rests on `gained - lost` images, nothing more."""
    a, b = reference.argmax(1), other.argmax(1)
    moved = a != b
    return int(moved.sum()), int((moved & (b == targets)).sum()), int((moved & (a == targets)).sum())


def subset_scores(probs: list[np.ndarray], weights: list[float], targets: np.ndarray, metric: str) -> list[tuple]:
    """(member indices, score, log loss) of every non-empty subset, best first (members keep their weights)."""
    m = len(probs)
    stacked = np.stack(probs).astype("float64")
    w = np.asarray(weights, dtype="float64")
    rows = []
    for mask in range(1, 2 ** m):
        idx = [i for i in range(m) if mask >> i & 1]
        if w[idx].sum() <= 0:
            continue
        mixed = np.tensordot(w[idx] / w[idx].sum(), stacked[idx], axes=1)
        rows.append((tuple(idx), score(metric, mixed, targets), log_loss(mixed, targets)))
    key = _better(metric)
    rows.sort(key=lambda r: key(r[1], r[2]), reverse=True)
    return rows


def greedy_selection(probs: list[np.ndarray], targets: np.ndarray, metric: str, rounds: int = 25):
    """Forward selection with replacement (Caruana et al., 2004; AutoGluon's ensemble selection): each round adds
    the member that most improves the running average; the best round's counts are the weights. Round one
    picks the best single member, so the result never scores below it on validation.
    Returns (counts per member, score, log loss, trajectory of (score, log loss) per round)."""
    key = _better(metric)
    stacked = np.stack(probs).astype("float64")
    counts, total = np.zeros(len(probs), dtype=int), np.zeros_like(stacked[0])
    trajectory, snapshots = [], []
    for r in range(1, rounds + 1):
        candidates = []
        for i in range(len(probs)):
            mixed = (total + stacked[i]) / r
            candidates.append((key(score(metric, mixed, targets), log_loss(mixed, targets)), i))
        _, best = max(candidates, key=lambda c: c[0])  # ties: the earliest member
        counts[best] += 1
        total += stacked[best]
        mixed = total / r
        trajectory.append((score(metric, mixed, targets), log_loss(mixed, targets)))
        snapshots.append(counts.copy())
    best_round = max(range(len(trajectory)), key=lambda r: (key(*trajectory[r]), -r))
    return snapshots[best_round], trajectory[best_round][0], trajectory[best_round][1], trajectory


def error_correlation(probs: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Pearson correlation of the members' per-image errors (1 - probability of the true class): near 1, two
    members fail on the same images and averaging them adds little."""
    errors = np.stack([1 - p[np.arange(len(targets)), targets] for p in probs])
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(errors)
    return np.nan_to_num(np.atleast_2d(corr), nan=0.0)


# --------------------------------------------------------------------------------------------- learned blends
BLEND_EPS = 1e-6  # floor for blends with negative weights (then renormalised); also clips stacking's log inputs
_TOL = 1e-12  # an "improvement" smaller than this is float noise, not progress

Predict = Callable[[list], np.ndarray]
Fit = Callable[[list, np.ndarray], Predict]


def _weights(weights, m: int, allow_negative: bool = False) -> np.ndarray:
    w = np.asarray(weights if weights is not None else [1.0] * m, dtype="float64")
    if w.shape != (m,):
        raise ValueError(f"{len(w)} weights for {m} members")
    if not allow_negative and (w < 0).any():
        raise ValueError("member weights must not be negative")
    if w.sum() <= 0:
        raise ValueError("member weights must sum to more than zero")
    return w / w.sum()


def _rows_sum_to_one(p: np.ndarray) -> np.ndarray:
    s = p.sum(1, keepdims=True)
    return np.divide(p, s, out=np.full_like(p, 1.0 / p.shape[1]), where=s > 0)  # an all-zero row: uniform


# --------------------------------------------------------------------------------------------- fixed blends
def rank_average(probs_list: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """Per class, the weighted mean of the members' ranks of that class's probability over the images (scaled to
    [0, 1]). Members with different calibration (a confident net, a timid one) then count by how they order
    images, not by their scale. Meant for ranking metrics (ROC AUC, per class: `roc_auc`); the rows are scores,
    not probabilities, and are not renormalised: dividing each row by its sum would reorder each class's column
    (a single member's macro AUC fell 0.7928 -> 0.7869) and leave the argmax where it is anyway. Two classes: the
    rows sum to one as they are (a member's two columns rank in reverse). Don't score log loss on it; for accuracy
    the argmax is what matters — ranks are comparable within a class, not across classes, so it can move
    argmaxes for the worse."""
    w = _weights(weights, len(probs_list))
    stacked = np.stack(probs_list).astype("float64")  # (members, images, classes)
    n = stacked.shape[1]
    ranks = np.apply_along_axis(average_ranks, 1, stacked)
    ranks = (ranks - 1) / (n - 1) if n > 1 else np.full_like(ranks, 0.5)
    return np.tensordot(w, ranks, axes=1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array, ties sharing their average rank: `scipy.stats.rankdata(values)` (tested
    equal) without importing scipy.stats, which costs `ens ablate` more than its whole computation."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    first = np.flatnonzero(starts)
    size = np.diff(np.r_[first, len(values)])
    ranks = np.empty(len(values))
    ranks[order] = (first + (size + 1) / 2)[np.cumsum(starts) - 1]
    return ranks


def power_average(probs_list: list[np.ndarray], weights: list[float] | None = None, power: float = 2.0) -> np.ndarray:
    """The weighted mean of p**power, rows renormalised. power > 1 lets confident members speak louder (a common
    Kaggle trick for AUC and accuracy); power = 1 is the plain weighted mean (`combine`); power < 1
    approaches a geometric mean, which punishes a member's confident mistakes."""
    if power <= 0:
        raise ValueError(f"power must be positive, not {power}")
    w = _weights(weights, len(probs_list))
    stacked = np.stack(probs_list).astype("float64")
    return _rows_sum_to_one(np.tensordot(w, stacked ** power, axes=1))


def clipped_blend(probs_list: list[np.ndarray], weights, eps: float = BLEND_EPS) -> np.ndarray:
    """sum(w_i p_i) / sum(w_i). With a negative weight, probabilities can go below zero: then they are clipped to
    `eps` and rows renormalised. With no negative weight it is exactly `combine`. Apply `hill_climb`'s
    weights to test probabilities with this, not with `combine` (which neither clips nor expects negatives)."""
    w = _weights(weights, len(probs_list), allow_negative=True)
    mixed = np.tensordot(w, np.stack(probs_list).astype("float64"), axes=1)
    if (w < 0).any():
        mixed = _rows_sum_to_one(np.clip(mixed, eps, None))
    return mixed


# --------------------------------------------------------------------------------------------- learned blends
def _key(metric: str, probs: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(signed score, -log loss): larger is better on both; log loss breaks ties (accuracy's are frequent)."""
    sign = 1.0 if GREATER_IS_BETTER[metric] else -1.0
    return sign * score(metric, probs, targets), -log_loss(probs, targets)


def _improves(new: tuple, old: tuple) -> bool:
    if new[0] > old[0] + _TOL:
        return True
    return abs(new[0] - old[0]) <= _TOL and new[1] > old[1] + _TOL


def hill_climb(probs_list: list[np.ndarray], targets: np.ndarray, metric: str, rounds: int = 100,
               allow_negative: bool = True, step=(0.05, 0.1, 0.2, 0.5),
               eps: float = BLEND_EPS) -> tuple[np.ndarray, float]:
    """Coordinate-wise hill climbing on the blend weights, as top Kaggle competitors blend OOF predictions: start
    from the best single member at weight 1, or from the plain mean where it scores better; each round try +s and -s on every member's weight for every step
    size s in `step` (a number or several: one small fixed step stalls on accuracy's plateaus, where each move
    first loses an image — on synthetic data 0.05 alone stopped ~8 points below the plain mean), keep the
    candidate that most improves (metric, then log loss as tie-breaker — so for accuracy it climbs log loss while
    accuracy ties), stop after `rounds` or when nothing improves. It may subtract a member (a negative weight
    cancels noise that member shares with others); the blend is then `clipped_blend`'s. Deterministic (members
    in order, small steps first, + before -; ties keep the earliest). Starting from the better of the two, it never
    scores below the best member or the plain mean on these rows — which is why its in-sample score is optimistic: `nested_cv_score` is honest.
    Returns (weights summing to one, score of the blend on these rows)."""
    stacked = np.stack(probs_list).astype("float64")
    m = len(stacked)

    def blend(total: np.ndarray, w: np.ndarray) -> np.ndarray:
        mixed = total / w.sum()
        return _rows_sum_to_one(np.clip(mixed, eps, None)) if (w < 0).any() else mixed

    steps = sorted({float(s) for s in np.atleast_1d(step)})
    if not steps or steps[0] <= 0:
        raise ValueError(f"steps must be positive, not {step}")
    deltas = [d for s in steps for d in (s, -s)]
    keys = [_key(metric, p, targets) for p in stacked]
    start = max(range(m), key=lambda i: (keys[i], -i))  # ties: the earliest member
    w = np.zeros(m)
    w[start] = 1.0
    total, best = stacked[start].copy(), keys[start]
    mean_key = _key(metric, stacked.mean(0), targets)
    if _improves(mean_key, best):  # climb from the plain mean when it is better: from one member, accuracy's
        w, total, best = np.full(m, 1.0 / m), stacked.sum(0) / m, mean_key  # plateaus can stop the climb below it
    for _ in range(rounds):
        found = None
        for i in range(m):
            for delta in deltas:
                cand = w.copy()
                cand[i] += delta
                if (not allow_negative and cand[i] < -_TOL) or cand.sum() < steps[0] / 2:
                    continue
                key = _key(metric, blend(total + delta * stacked[i], cand), targets)
                if _improves(key, found[0] if found else best):
                    found = (key, i, delta)
        if found is None:
            break
        best, i, delta = found
        w[i] += delta
        total += delta * stacked[i]
    w = np.where(np.abs(w) < _TOL, 0.0, w)  # -0.05 + 0.05 is not exactly zero
    w = w / w.sum()
    return w, float(score(metric, clipped_blend(probs_list, w, eps), targets))


def hill_climb_fitter(metric: str, rounds: int = 100, allow_negative: bool = True, step=(0.05, 0.1, 0.2, 0.5),
                      eps: float = BLEND_EPS) -> Fit:
    """`hill_climb` as a `fit` for `nested_cv_score`: fit(probs_list, targets) -> predict(probs_list) -> probs."""
    def fit(probs_list, targets):
        w, _ = hill_climb(probs_list, targets, metric, rounds, allow_negative, step, eps)
        return _with_weights(lambda ps: clipped_blend(ps, w, eps), w)
    return fit


def _with_weights(predict: Predict, weights) -> Predict:
    predict.weights = np.asarray(weights, dtype="float64")  # what a verb shows and records of the learned blend
    return predict


def _stack_features(probs_list: list[np.ndarray], eps: float) -> np.ndarray:
    return np.concatenate([np.log(np.clip(np.asarray(p, dtype="float64"), eps, 1.0)) for p in probs_list], axis=1)


class Stacker:
    """A fitted multinomial (binary: logistic) regression: `coef_` (one row per class seen, one for two classes),
    `intercept_`, `classes_` (the target values seen in training), `ens_eps_` (the log inputs' floor)."""

    def __init__(self, coef, intercept, classes, eps):
        self.coef_, self.intercept_, self.classes_, self.ens_eps_ = coef, intercept, classes, eps

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.coef_.T + self.intercept_
        if len(self.classes_) == 2:
            p1 = 1 / (1 + np.exp(-z[:, 0]))
            return np.stack([1 - p1, p1], axis=1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


def _logistic_loss(x: np.ndarray, y: np.ndarray, k: int, C: float):
    """scikit-learn's L2 logistic regression objective, (1/n)·Σ log loss + ||coef||² / (2·C·n) (the intercept not
    penalised), and its gradient, over the parameters laid out as scikit-learn's lbfgs path lays them out (binary:
    [coef, intercept]; multinomial: the (classes × features+1) matrix raveled in Fortran order), so that scipy's
    L-BFGS takes the same steps."""
    n, d = x.shape
    cols = 1 if k == 2 else k
    onehot = (y[:, None] == np.arange(k)[None, :]).astype("float64")

    def f(theta):
        wb = theta.reshape(cols, d + 1, order="F")
        w, b = wb[:, :d], wb[:, d]
        z = x @ w.T + b
        if k == 2:
            t = onehot[:, 1:]
            loss = np.logaddexp(0, z) - t * z  # -log σ(z) or -log(1 - σ(z))
            resid = 1 / (1 + np.exp(-z)) - t
        else:
            top = z.max(1, keepdims=True)
            e = np.exp(z - top)
            total = e.sum(1, keepdims=True)
            loss = top + np.log(total) - (z * onehot).sum(1, keepdims=True)
            resid = e / total - onehot
        value = loss.sum() / n + (w * w).sum() / (2 * C * n)
        grad = np.concatenate([resid.T @ x / n + w / (C * n), resid.sum(0)[:, None] / n], axis=1)
        return value, grad.ravel(order="F")

    return f, cols


def stacking_fit(probs_list: list[np.ndarray], targets: np.ndarray, C: float = 1.0, eps: float = BLEND_EPS) -> Stacker:
    """A multinomial logistic regression on the members' concatenated, clipped log-probabilities: it can
    re-temper a miscalibrated member, shift a class's bias and weigh members per class, which no weighted mean
    can. C is the inverse L2 strength (small C: close to equal weights; use it on few OOF rows). Deterministic.
    What `sklearn.linear_model.LogisticRegression(C=C, max_iter=5000)` fits — its objective, minimised by the same
    scipy L-BFGS call with the same settings (tested against it) — without importing scikit-learn, whose import
    costs `ens ablate` more than its whole computation. Predict with `stacking_predict`."""
    from scipy.optimize import minimize

    x = _stack_features(probs_list, eps)
    classes, y = np.unique(np.asarray(targets), return_inverse=True)
    d = x.shape[1]
    if len(classes) < 2:  # one class seen: it is certain (there is nothing to weigh)
        return Stacker(np.zeros((1, d)), np.array([0.0]), classes, eps)
    f, cols = _logistic_loss(x, y, len(classes), C)
    # one BLAS thread: the problem is small, and threads only contend (20x slower with two here, in L-BFGS's core)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        res = minimize(f, np.zeros(cols * (d + 1)), jac=True, method="L-BFGS-B",
                       options={"maxiter": 5000, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
    wb = res.x.reshape(cols, d + 1, order="F")
    return Stacker(wb[:, :d], wb[:, d], classes, eps)


def stacking_predict(model, probs_list: list[np.ndarray]) -> np.ndarray:
    """Class probabilities of the stacker, one column per class of the members' probabilities (a class absent
    from the training targets gets probability zero, so columns still line up with the vocabulary)."""
    x = _stack_features(probs_list, getattr(model, "ens_eps_", BLEND_EPS))
    out = np.zeros((len(x), probs_list[0].shape[1]))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def stacking_fitter(C: float = 1.0, eps: float = BLEND_EPS) -> Fit:
    """`stacking_fit` as a `fit` for `nested_cv_score`."""
    def fit(probs_list, targets):
        model = stacking_fit(probs_list, targets, C, eps)
        return lambda ps: stacking_predict(model, ps)
    return fit


def nested_cv_score(probs_list: list[np.ndarray], targets: np.ndarray, folds, fit: Fit,
                    metric: str) -> tuple[float, list[float]]:
    score_, per_fold, _ = nested_cv(probs_list, targets, folds, fit, metric)
    return score_, per_fold


def nested_cv(probs_list: list[np.ndarray], targets: np.ndarray, folds, fit: Fit,
              metric: str) -> tuple[float, list[float], np.ndarray]:
    """The honest score of a blend whose weights are learned (hill climbing, stacking): for each fold k, learn on
    the other folds' OOF rows, predict fold k's rows; no row is ever scored by a blend learned on it. `folds` is
    each row's fold id (the k-fold split that produced the OOF probabilities). Returns (the metric over all
    held-out predictions together, the metric of each fold in sorted fold-id order). Expect it below the
    in-sample score of the same blend; the gap is the blend's own overfitting. `nested_cv` also returns the
    held-out probabilities themselves (every row blended by weights learned without it)."""
    targets = np.asarray(targets)
    folds = np.asarray(folds)
    if folds.shape != targets.shape:
        raise ValueError(f"{folds.shape} fold ids for {targets.shape} targets")
    ids = np.unique(folds)
    if len(ids) < 2:
        raise ValueError("nested cross-validation needs at least two folds")
    stacked = [np.asarray(p, dtype="float64") for p in probs_list]
    held_out = np.full((len(targets), stacked[0].shape[1]), np.nan)
    per_fold = []
    for k in ids:
        test = folds == k
        predict = fit([p[~test] for p in stacked], targets[~test])
        held_out[test] = predict([p[test] for p in stacked])
        per_fold.append(float(score(metric, held_out[test], targets[test])))
    return float(score(metric, held_out, targets)), per_fold, held_out


# --------------------------------------------------------------------------------------------- is it better?
class Interval(tuple):
    """(observed difference, low, high) of a paired bootstrap's 95% percentile interval, with `lacking`: how many
    resamples lacked a class the rows hold (their ROC AUC averages the classes present), and `dropped`: how many
    had no score at all (a single class left) and are not in the interval."""

    def __new__(cls, delta: float, low: float, high: float, lacking: int = 0, dropped: int = 0):
        self = super().__new__(cls, (float(delta), float(low), float(high)))
        self.lacking, self.dropped = lacking, dropped
        return self


def _codes(groups, n: int) -> np.ndarray | None:
    """Each row's group as 0..G-1, or None without groups."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"{groups.shape} groups for {n} rows")
    return np.unique(groups, return_inverse=True)[1].ravel()


def _bootstrap_means(d: np.ndarray, n_boot: int, seed: int, groups=None) -> np.ndarray:
    """The mean of `d` over `n_boot` resamples: rows drawn with replacement, or with `groups` whole groups (a
    cluster bootstrap: the images of one patient or plant share their errors, so they are not independent
    draws, and resampling them one by one makes the interval far too narrow — 35% of 5%-level intervals
    excluded 0 on equally good models with 40 groups × 15 images). Each resample's mean is over its images."""
    n = len(d)
    rng = np.random.default_rng(seed)
    codes = _codes(groups, n)
    if codes is None:
        sums, sizes = d, np.ones(n)
    else:
        sums, sizes = np.bincount(codes, weights=d), np.bincount(codes).astype("float64")
    k = len(sums)
    chunk = max(1, 4_000_000 // k)  # bounded memory on large validation sets
    return np.concatenate([_ratio(sums, sizes, rng.integers(0, k, size=(min(chunk, n_boot - s), k)))
                           for s in range(0, n_boot, chunk)])


def _ratio(sums: np.ndarray, sizes: np.ndarray, draws: np.ndarray) -> np.ndarray:
    return sums[draws].sum(1) / sizes[draws].sum(1)


def paired_bootstrap(correct_a, correct_b, n_boot: int = 2000, seed: int = 0, groups=None) -> Interval:
    """Is ensemble A more accurate than B on these images, or is the difference luck? Resamples the images with
    replacement (the same images for both: the comparison is paired; with `groups`, whole groups: see
    `_bootstrap_means`) and returns (observed accuracy(a) - accuracy(b), low, high) of the 95% percentile
    interval. An interval that contains 0 means "not shown". Reproducible: a numpy Generator seeded with `seed`."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError("correct_a and correct_b must be equal-length, non-empty 1-d arrays")
    d = a.astype("float64") - b.astype("float64")
    low, high = np.percentile(_bootstrap_means(d, n_boot, seed, groups), [2.5, 97.5])
    return Interval(d.mean(), low, high)


def mcnemar_p(correct_a, correct_b, groups=None) -> float:
    """Exact McNemar test: only the images exactly one of A and B gets right tell them apart; under "equally
    good" each such image is a fair coin. Two-sided p-value of scipy's exact binomial test; 1.0 with none.
    With `groups` the images of a group are not independent coins: Durkalski et al.'s (2003) clustered McNemar
    test, (sum over groups of (only A - only B))^2 / sum of its squares, against chi-squared with 1 degree of
    freedom; with one image per group it is McNemar's chi-squared test."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("correct_a and correct_b must have the same length")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    codes = _codes(groups, len(a))
    if codes is not None:  # chi-squared with 1 degree of freedom: P(X > x) = erfc(sqrt(x / 2))
        per_group = np.bincount(codes, weights=(a & ~b).astype("float64") - (~a & b))
        spread = (per_group ** 2).sum()
        if spread == 0:  # every group's discordant images cancel: nothing tells A and B apart
            return 1.0
        return math.erfc(math.sqrt(per_group.sum() ** 2 / spread / 2))
    # Bin(n, ½) is symmetric: the outcomes at most as likely as the one seen are both tails beyond it, so
    # scipy.stats.binomtest's two-sided p-value is 2·P(X ≤ min(a, b)) (tested equal), in exact integers here:
    # importing scipy.stats costs `ens ablate` more than its whole computation
    n, low = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n)


def paired_bootstrap_metric(metric: str, probs_a: np.ndarray, probs_b: np.ndarray, targets: np.ndarray,
                            n_boot: int = 1000, seed: int = 0, groups=None) -> Interval:
    """`paired_bootstrap` for any metric: (metric(a) - metric(b), low, high) of the 95% percentile interval over
    images resampled with replacement (the same images for both; with `groups`, whole groups). Accuracy and log
    loss are means of per-image values, resampled at once; F1 and ROC AUC are recomputed per resample, and the
    result counts the resamples that lacked a class and those with no score (`Interval`)."""
    targets = np.asarray(targets)
    if metric == "accuracy":
        return paired_bootstrap(probs_a.argmax(1) == targets, probs_b.argmax(1) == targets, n_boot, seed, groups)
    if metric == "log_loss":
        def per_image(p):
            p = np.clip(p, EPS, 1 - EPS)
            p = p / p.sum(1, keepdims=True)
            return -np.log(p[np.arange(len(targets)), targets])
        d = per_image(probs_a) - per_image(probs_b)
        low, high = np.percentile(_bootstrap_means(d, n_boot, seed, groups), [2.5, 97.5])
        return Interval(d.mean(), low, high)
    rng = np.random.default_rng(seed)
    n = len(targets)
    codes = _codes(groups, n)
    k = n if codes is None else int(codes.max()) + 1
    present = len(np.unique(targets))
    diffs, lacking = [], 0
    for _ in range(n_boot):
        draw = rng.integers(0, k, k)
        idx = draw if codes is None else np.repeat(np.arange(n), np.bincount(draw, minlength=k)[codes])
        lacking += len(np.unique(targets[idx])) < present
        a, b = score(metric, probs_a[idx], targets[idx]), score(metric, probs_b[idx], targets[idx])
        if a == a and b == b:  # a resample with a single class has no AUC
            diffs.append(a - b)
    low, high = np.percentile(diffs, [2.5, 97.5]) if diffs else (float("nan"), float("nan"))
    return Interval(score(metric, probs_a, targets) - score(metric, probs_b, targets), low, high,
                    lacking, n_boot - len(diffs))


# --------------------------------------------------------------------------------------------- the ensemble's blend
def greedy_fitter(metric: str, rounds: int = 25) -> Fit:
    """`greedy_selection` as a `fit` for `nested_cv_score`: its counts are the weights of a plain mean."""
    def fit(probs_list, targets):
        counts = greedy_selection(probs_list, targets, metric, rounds)[0]
        return _with_weights(lambda ps: combine(ps, counts), counts)
    return fit


def subset_fitter(metric: str, weights: list[float]) -> Fit:
    """The best subset (`subset_scores`) as a `fit` for `nested_cv_score`: the subset is chosen on the rows it
    is fitted on, and blended as the weighted mean of its members' `weights` (indices into every member)."""
    def fit(probs_list, targets):
        idx = list(subset_scores(probs_list, weights, targets, metric)[0][0])
        w = np.zeros(len(probs_list))
        w[idx] = np.asarray(weights, dtype="float64")[idx]
        return _with_weights(lambda ps: combine(ps, w), w)
    return fit


def _fitter(combine_cfg, metric: str, weights: list[float]) -> Fit:
    method = combine_cfg.method
    if method == "subset":
        return subset_fitter(metric, weights)
    if method == "greedy":
        return greedy_fitter(metric, combine_cfg.rounds)
    if method == "hill_climb":
        return hill_climb_fitter(metric, combine_cfg.rounds, combine_cfg.allow_negative)
    return stacking_fitter(combine_cfg.C)


def fixed_blend(combine_cfg, probs_list: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """A blend without learned weights: the weighted mean, rank or power average."""
    if combine_cfg.method == "rank":
        return rank_average(probs_list, weights)
    if combine_cfg.method == "power":
        return power_average(probs_list, weights, combine_cfg.power)
    return combine(probs_list, weights)


class Blended:
    """An ensemble's blend of its members: validation (or out-of-fold) and test probabilities, the score on the
    validation rows (`in_sample`: optimistic when the weights were learned on them) and `honest`, the score
    to trust: nested cross-validation for learned blends, the plain score for fixed ones."""

    def __init__(self, valid, test, in_sample, honest, per_fold, weights, learned, held_out=None):
        self.valid, self.test, self.in_sample, self.honest = valid, test, in_sample, honest
        self.per_fold, self.weights, self.learned = per_fold, weights, learned
        # the validation rows as the honest score sees them: a learned blend's nested-CV predictions (each row
        # blended by weights learned without it), a fixed blend's own
        self.held_out = valid if held_out is None else held_out


def blend(combine_cfg, valid_list: list[np.ndarray], test_list: list[np.ndarray], targets: np.ndarray,
          weights: list[float], folds: np.ndarray, metric: str) -> Blended:
    """The members blended as `combine_cfg` says (config.Combine). A learned blend is fitted on every validation
    row and applied to the test rows; its honest score is `nested_cv_score` over `folds` (each validation row's
    fold: the cross-validation folds, or parts of the holdout). `weights` (the members' YAML weights) weigh the
    fixed blends."""
    targets, folds = np.asarray(targets), np.asarray(folds)
    if combine_cfg.learned:
        fit = _fitter(combine_cfg, metric, weights)
        predict = fit(valid_list, targets)
        valid, test = predict(valid_list), predict(test_list)
        honest, per_fold, held_out = nested_cv(valid_list, targets, folds, fit, metric)
        weights = getattr(predict, "weights", None)  # stacking has per-class coefficients, not member weights
        in_sample = score(metric, valid, targets)
        return Blended(valid, test, in_sample, honest, per_fold, None if weights is None else list(weights), True,
                       held_out)
    valid, test = fixed_blend(combine_cfg, valid_list, weights), fixed_blend(combine_cfg, test_list, weights)
    in_sample = score(metric, valid, targets)
    per_fold = [score(metric, valid[folds == k], targets[folds == k]) for k in np.unique(folds)]
    return Blended(valid, test, in_sample, in_sample, per_fold, list(weights), False)
