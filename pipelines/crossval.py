"""Cross-validated members (`validation: cv`): a member's fold models' cache entries joined into one entry of
out-of-fold (OOF) probabilities, every training image predicted by the one model that did not see it, and test
probabilities from the mean of the fold models (or from a refit on every training image).

Pure numpy over cache entries: ablation and reports read joined members without importing torch.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .cache import Entry
from .data import CompetitionData

KINDS = ("plain", "tta", "aug")
HOW_ORDER = ("trained", "resumed", "predicted", "derived", "cached")  # the costliest way a fold was computed first


def unit_name(fold) -> str:
    """How a fold model is named in messages: 'fold 2', or 'refit'."""
    return "refit" if fold == "refit" else f"fold {fold}"


def join_folds(data: CompetitionData, fold_ids: list[int], folds: dict[int, Entry],
               refit: Entry | None, scores) -> Entry:
    """One entry for the member: `valid_*` are the OOF probabilities of every training image in `data`'s order
    (`valid_ids` the training paths, `valid_folds` the fold that held each out), `test_*` the mean of the fold
    models' test probabilities, or the refit model's. `scores(arrays, vocab, names)` adds the metrics (run's).
    Raises ValueError when a fold entry's rows are not exactly its fold's images."""
    rows = {p: i for i, p in enumerate(data.train_paths)}
    first = next(iter(folds.values()))
    vocab = first.vocab
    views = [k.removeprefix("valid_") for k in first.arrays if k.startswith("valid_view_")]
    kinds = [k for k in (*KINDS, *views) if all(f"valid_{k}" in e.arrays for e in folds.values())]
    n, c = len(data.train_paths), len(vocab)
    oof = {k: np.full((n, c), np.nan, dtype="float32") for k in kinds}
    source = np.full(n, -1)
    for fold, entry in sorted(folds.items()):
        if entry.vocab != vocab:
            raise ValueError(f"{unit_name(fold)} has classes {entry.vocab}, other folds {vocab}")
        ids = [str(i) for i in entry.arrays["valid_ids"]]
        expected = [p for p, f in zip(data.train_paths, fold_ids) if f == fold]
        if sorted(ids) != sorted(expected):
            raise ValueError(f"{unit_name(fold)}'s entry {entry.key} validated on other images than fold {fold} holds")
        idx = np.array([rows[i] for i in ids], dtype=int)
        for k in kinds:
            oof[k][idx] = entry.arrays[f"valid_{k}"]
        source[idx] = fold
    if (source < 0).any():
        raise ValueError(f"{int((source < 0).sum())} training images have no out-of-fold prediction")
    test_from = [refit] if refit is not None else [folds[f] for f in sorted(folds)]
    arrays = {f"valid_{k}": oof[k] for k in kinds}
    for k in kinds:
        if all(f"test_{k}" in e.arrays for e in test_from):
            arrays[f"test_{k}"] = np.mean([e.arrays[f"test_{k}"] for e in test_from], axis=0).astype("float32")
    arrays.update(valid_targets=np.array([vocab.index(l) for l in data.train_labels], dtype="int64"),
                  valid_ids=np.array(data.train_paths), valid_folds=np.asarray(fold_ids, dtype="int64"),
                  test_ids=first.arrays["test_ids"], vocab=first.arrays["vocab"])
    units = [(f, folds[f]) for f in sorted(folds)] + ([("refit", refit)] if refit is not None else [])
    key = "cv-" + hashlib.sha256(json.dumps([e.key for _, e in units]).encode()).hexdigest()[:20]
    timings = {}
    for _, e in units:
        for name, seconds in (e.meta.get("timings") or {}).items():
            timings[name] = round(timings.get(name, 0.0) + seconds, 2)
    meta = dict(first.meta, key=key, computed="joined", timings=timings, history=[], train_key=None,
                cv={"folds": len(folds), "refit": refit is not None, "test": "refit" if refit is not None else "fold mean"},
                units=[{"fold": f, "key": e.key, "train_key": e.train_key, "metrics": e.meta.get("metrics", {}),
                        "history": e.meta.get("history", []), "timings": e.meta.get("timings", {}),
                        "computed": e.meta.get("computed")} for f, e in units])
    meta.update(scores(arrays, vocab, first.meta.get("metric_names", ["accuracy", "log_loss"])))
    return Entry(key, first.path.parent / key, meta, arrays)


def costliest(hows: list[str]) -> str:
    """A cross-validated member's `how`: the costliest way one of its fold models was computed."""
    return min(hows, key=HOW_ORDER.index)


def holdout_parts(valid_ids, targets, seed: int, parts: int = 5, groups=None) -> np.ndarray:
    """The folds nested cross-validation scores a learned blend over in a holdout ensemble: `parts` stratified,
    hash-based parts of the validation images (fewer when there are fewer images); with `groups` (each image's
    `cv.group_column`), whole groups to a part (fewer parts when there are fewer groups), as the cv folds are."""
    from .data import fold_assignment

    ids = [str(i) for i in valid_ids]
    groups = None if groups is None else [str(g) for g in groups]
    k = max(2, min(parts, len(ids) if groups is None else len(set(groups))))
    return np.asarray(fold_assignment(ids, [str(t) for t in targets], k, seed, stratified=True, groups=groups))
