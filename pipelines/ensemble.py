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


METRICS = {"accuracy": accuracy, "log_loss": log_loss, "f1_macro": f1_macro}
GREATER_IS_BETTER = {"accuracy": True, "log_loss": False, "f1_macro": True}


def score(metric: str, probs: np.ndarray, targets: np.ndarray) -> float:
    return METRICS[metric](probs, targets)
