"""Combining members' probabilities and scoring them with the competition's metric. Pure numpy (scikit-learn for
the metrics it already does well): ablation and selection will call these thousands of times."""

from __future__ import annotations

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
    """Two classes: the AUC of the second class's probability (symmetric: the first's gives the same);
    more: the one-vs-rest macro average. NaN when the targets hold a single class."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(targets)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets == 1, probs[:, 1]))
    return float(roc_auc_score(targets, probs, multi_class="ovr", labels=np.arange(probs.shape[1])))


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
