"""The unit of work: one member (or one fold model of it) from its data to a cache entry — data → train → predict →
cache — or derived from what the cache already holds. A sequential run and a Ray task both call `member_entry`
from here; neither driver is imported.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np

from . import ensemble
from .cache import Entry, MemberCache, train_key
from .config import Ensemble, Member, Project, load_ensemble
from .data import CompetitionData, load_data
from .errors import EnsError
from .util import file_lock, say


def versions() -> dict:
    return {p: version(p) for p in ("fastai", "timm", "torch", "torchvision", "numpy")} | {"python": platform.python_version()}


def member_entry(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str,
                 progress, worker: dict | None = None) -> tuple[Entry, str]:
    """The member's entry, computed as cheaply as the cache allows, and how: 'derived' (the arrays of an entry
    of the same weights and passes give another beta), 'predicted' (kept weights, new TTA), 'trained' or
    'resumed'. Under the training key's lock: a second run wanting the same weights waits, then reads them.
    `worker` (a Ray task's host, pid, node, GPUs) joins the meta of what is trained."""
    waiting = lambda: say(progress)(f"{member.name}: another ens run is computing it (key {train}); "
                                    "waiting for it to finish")
    with file_lock(cache.lock(train), on_wait=waiting):
        entry, how = _compute_entry(member, data, cache, train, key, progress, worker)
        # the checkpoints of an interrupted training have served once an entry exists (one is left when the
        # rerun predicts from weights kept before the interruption)
        shutil.rmtree(cache.partial(train), ignore_errors=True)
        return entry, how


def _compute_entry(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str,
                   progress, worker: dict | None) -> tuple[Entry, str]:
    """`member_entry`'s work, under its lock."""
    entry = cache.load(key)
    if entry is not None:
        return entry, "cached"
    sibling = cache.tta_sibling(train, member.tta_passes, member.tta.view_names) \
        if member.tta_passes or member.tta.views else None
    if sibling is not None:
        return _derive(member, sibling, cache, key), "derived"
    if member.prepare:
        from .data import prepare_data

        data = prepare_data(data, member.prepare, cache.root.parent)
    kept = cache.model_meta(train)
    if kept is not None:
        return _predict_kept(member, data, cache, train, key, kept, progress), "predicted"
    return _train_and_predict(member, data, cache, train, key, progress, worker)


def _derive(member: Member, sibling: Entry, cache: MemberCache, key: str) -> Entry:
    """Another beta over the same augmented passes: a blend of cached arrays, no prediction."""
    from .cache import tta_probs_of

    views = member.tta.view_names
    arrays = {k: v for k, v in sibling.arrays.items() if "_view_" not in k or k.split("_view_", 1)[1] in views}
    for split in ("valid", "test"):
        arrays[f"{split}_tta"] = tta_probs_of(arrays, split, member.tta.beta, member.tta_passes, views)
    meta = dict(sibling.meta, member=member.model_dump(mode="json"), key_fields=member.key_fields(),
                derived_from=sibling.key, computed="derived", created=_now())
    meta.update(member_scores(arrays, sibling.vocab, sibling.meta.get("metric_names", ["accuracy", "log_loss"])))
    return cache.save(key, arrays, meta)


def member_scores(probs: dict, vocab: list[str], names) -> dict:
    """Validation metrics and per-class tables of `probs`, plain and TTA."""
    targets = probs["valid_targets"]
    names = list(dict.fromkeys(["accuracy", "log_loss", *names]))
    if not len(targets):  # a refit on every training image: nothing to score it on
        return {"metrics": {}, "per_class": {}, "metric_names": names}
    return {"metrics": {f"{kind}_{name}": ensemble.score(name, probs[f"valid_{kind}"], targets)
                        for kind in ("plain", "tta") for name in names},
            "per_class": {kind: ensemble.per_class(probs[f"valid_{kind}"], targets, vocab) for kind in ("plain", "tta")},
            "metric_names": names}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry_from(member: Member, data: CompetitionData, cache: MemberCache, key: str, learn, trained_meta: dict,
                progress) -> Entry:
    """Predict with `learn` and write the entry: probabilities, scores, and how the weights were made."""
    from .predict import predict_member

    probs, predict_seconds = predict_member(learn, member, data, progress)
    vocab = list(learn.dls.vocab)
    if vocab != data.vocab:
        raise RuntimeError(f"the learner's vocab {vocab} differs from the competition's {data.vocab}")
    return _save_probs(member, data, cache, key, probs, trained_meta, predict_seconds)


def _save_probs(member: Member, data: CompetitionData, cache: MemberCache, key: str, probs: dict,
                trained_meta: dict, predict_seconds: float) -> Entry:
    vocab = data.vocab
    arrays = dict(probs, valid_ids=np.array(data.valid_paths), test_ids=np.array(data.test_ids), vocab=np.array(vocab))
    timings = dict(trained_meta.get("timings") or {}, predict_seconds=round(predict_seconds, 2))
    meta = dict(trained_meta, member=member.model_dump(mode="json"), key_fields=member.key_fields(),
                timings=timings, created=_now(), **member_scores(arrays, vocab, [data.competition.metric]))
    return cache.save(key, arrays, meta)


def _predict_kept(member, data, cache: MemberCache, train: str, key: str, kept: dict, progress) -> Entry:
    from .predict import learner_from_weights

    learn = learner_from_weights(member, data, cache.model_file(train), kept["normalize"],
                                 kept.get("precision", "fp32"))
    return _entry_from(member, data, cache, key, learn, dict(kept, computed="predicted"), progress)


def _train_and_predict(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str,
                       progress, worker: dict | None = None) -> tuple[Entry, str]:
    from .train import train_member

    if member.classical:
        return _classical_entry(member, data, cache, train, key, progress, worker), "trained"
    partial = cache.partial(train)  # per-epoch checkpoints of an unfinished member: a rerun resumes there
    try:
        trained = train_member(member, data, progress, checkpoint_dir=partial)
    except RuntimeError as e:
        if "input size" in str(e) or "Input image height" in str(e) or "Input height" in str(e):
            raise EnsError(f"member {member.name}: size {member.final_size} is too small or does not fit "
                           f"{member.arch} ({str(e).splitlines()[0]}); choose a larger size") from None
        raise
    trained_meta = _trained_meta(member, data, train, trained.seconds, trained.history, trained.device, worker,
                                 resumed_at=trained.resumed_at, memory=trained.memory, normalize=trained.normalize,
                                 precision=trained.precision, deterministic=trained.deterministic,
                                 startup_timings=trained.startup,  # seconds to the first step, by phase
                                 pseudo_labels=len(set(data.train_paths) & set(data.test_paths)) if member.pseudo else None)
    if member.keep_model:  # what a TTA change, `ens eval`, `ens bench` and code competitions need
        cache.save_model(train, trained.learn.model.state_dict(), dict(trained_meta, created=_now()))
    entry = _entry_from(member, data, cache, key, trained.learn, trained_meta, progress)
    return entry, "resumed" if trained.resumed_at else "trained"  # `member_entry` removes the partial


def _classical_entry(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str, progress,
                     worker: dict | None) -> Entry:
    """A classical member (`classical.py`): features of the member's decoded copy at its size (every image
    decoded once, as `decode: true` does), a scikit-learn classifier fitted on the training images, its class
    probabilities of the validation and test images (no TTA: the plain probabilities are the TTA's)."""
    from .classical import fit_predict
    from .data.decoded import decoded_images
    from .data.loaders import _hw

    start = time.perf_counter()
    say(progress)(f"{member.name} ({member.arch}): features of {len(data.train_paths) + len(data.test_paths)} images "
                  "and a scikit-learn classifier")
    decoded = decoded_images(data, _hw(member.final_size), say(progress))
    images, index = decoded.images, {label: i for i, label in enumerate(data.vocab)}
    rows = np.array(decoded.rows(data.train_paths))
    targets = np.array([index[label] for label in data.train_labels], dtype="int64")
    train_rows = [i for i, v in enumerate(data.is_valid) if not v]
    valid_rows = [i for i, v in enumerate(data.is_valid) if v]
    probs = fit_predict(member.arch, images[rows[train_rows]], targets[train_rows],
                        {"valid": images[rows[valid_rows]], "test": images[decoded.rows(data.test_paths)]},
                        seed=member.seed, n_classes=len(data.vocab))
    seconds = time.perf_counter() - start
    arrays = {"valid_plain": probs["valid"], "valid_tta": probs["valid"], "test_plain": probs["test"],
              "test_tta": probs["test"], "valid_targets": targets[valid_rows]}
    meta = _trained_meta(member, data, train, seconds, [], "cpu", worker,
                         seconds_per_image=round(seconds / max(1, len(data.train_paths) + len(data.test_paths)), 5))
    meta["versions"]["scikit-learn"] = version("scikit-learn")
    return _save_probs(member, data, cache, key, arrays, meta, 0.0)


def _trained_meta(member: Member, data: CompetitionData, train: str, seconds: float, history: list, device: str,
                  worker: dict | None, **more) -> dict:
    """How a member's cache entry (and kept weights) were made: what `ens cache ls`, reports and resumes read."""
    return {
        "computed": "trained",  # or "predicted" from kept weights, or "derived" from another entry's arrays
        "competition": data.competition.name,
        "train_key": train,
        "train_fields": member.train_fields(),
        "data_fingerprint": data.fingerprint,
        "cv": data.cv_fold,  # None, or which fold of which cross-validation (`ens cache ls` groups by it)
        "images": {"train": sum(not v for v in data.is_valid),  # what `ens plan` scales measured rates by
                   "predicted": sum(data.is_valid) + len(data.test_paths)},
        "history": history,
        "timings": {"train_seconds": round(seconds, 2)},
        "device": device,
        "threads": _threads(),
        "worker": worker or {"host": platform.node(), "pid": os.getpid()},
        "versions": versions(),
        **more,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def member_data(project: Project, member: Member, data: CompetitionData, fold, seen: tuple = (), *,
                gather) -> CompetitionData:
    """The data `member` trains on for `fold` (None: holdout; k; 'refit'): `data`, plus its pseudo-labelled test
    images when it has `pseudo:` (`config.Pseudo`), chosen from the teacher's cached test predictions that never
    saw this unit's validation images."""
    if member.distill is not None:
        from .data import with_soft_targets

        probs = _teacher_test_probs(project, member, member.distill.teacher, fold, seen, gather)
        tempered = probs.astype("float64") ** (1 / member.distill.temperature)
        return with_soft_targets(data, tempered / tempered.sum(1, keepdims=True), member.distill.weight)
    if member.pseudo is None:
        return data
    from .data import with_pseudo_labels

    probs = _teacher_test_probs(project, member, member.pseudo.teacher, fold, seen, gather)
    pick = probs.max(1) >= member.pseudo.threshold if member.pseudo.threshold is not None else \
        _top_per_class(probs, member.pseudo.top)
    labels = [data.vocab[i] for i in probs.argmax(1)]
    chosen = [i for i in range(len(probs)) if pick[i]]
    return with_pseudo_labels(data, [data.test_paths[i] for i in chosen], [labels[i] for i in chosen])


def _top_per_class(probs: np.ndarray, share: float) -> np.ndarray:
    """The `share` most confident test images of each predicted class (at least one of each class predicted)."""
    pick = np.zeros(len(probs), dtype=bool)
    predicted, confidence = probs.argmax(1), probs.max(1)
    for c in np.unique(predicted):
        rows = np.flatnonzero(predicted == c)
        keep = max(1, int(round(len(rows) * share)))
        pick[rows[np.argsort(-confidence[rows], kind="stable")[:keep]]] = True
    return pick


def _teacher_test_probs(project: Project, member: Member, spec: str, fold, seen: tuple, gather) -> np.ndarray:
    """The teacher's blended test probabilities (its members' weighted mean of their `probs:` kind) that a unit of
    `member` may learn from: a holdout unit, a holdout teacher's; fold f, the teacher's fold-f models'; the refit,
    the teacher's own (fold mean or refit)."""
    if spec in seen:
        raise EnsError(f"member {member.name}: its teacher {spec} leads back to itself ({' → '.join(seen)})")
    g = gather(project, spec, cached_only=True, seen=(*seen, spec))  # the driver's `run.gather_members`
    shown = project.relative(g.path)
    if g.missing or g.incomplete:
        raise EnsError(f"member {member.name}: its teacher {shown} is not fully cached "
                       f"({', '.join(m.name for m in g.missing)}); run `ens run {shown}` first")
    if (fold is None) != (not g.cv) and fold != "refit":
        mine = "holdout" if fold is None else "cross-validated"
        raise EnsError(f"member {member.name}: a {mine} member needs a {mine} teacher ({shown} is not): the teacher's "
                       "models must not have seen the member's validation images; pick another teacher")
    kind = g.ensemble.probs
    if fold is None or fold == "refit":
        probs = [o.entry.probs("test", kind) for o in g.outcomes]
    else:
        probs = [next(u.entry for u in o.folds if u.fold == fold).probs("test", kind) for o in g.outcomes]
    return ensemble.combine(probs, [o.member.weight for o in g.outcomes])


def fold_variants(ens: Ensemble, data: CompetitionData, folds: list[int] | None, shown: str):
    """[(fold, data, compute)] every member is trained on, and the folds of the training images (cv) or None:
    the holdout split; or each fold of the competition's cv (and a refit on every image with `refit: full`),
    those outside `folds` read from the cache but not computed."""
    if ens.validation != "cv":
        if folds is not None:
            raise EnsError(f"{shown}: --folds needs a cross-validated ensemble (validation: cv)")
        return [(None, data, True)], None
    from .data import cv_folds, fold_data

    fold_ids = cv_folds(data)
    k = data.competition.cv.folds
    bad = [f for f in folds or () if not 0 <= f < k]
    if bad:
        raise EnsError(f"--folds {','.join(map(str, folds))}: the competition has folds 0 to {k - 1}; fix --folds")
    variants = [(f, fold_data(data, fold_ids, f), folds is None or f in folds) for f in range(k)]
    if ens.refit == "full":
        variants.append(("refit", fold_data(data, fold_ids, None), folds is None))
    return variants, fold_ids


def compute_member(root: str, spec: str, overrides: list[str], member_name: str, fold, train: str, key: str,
                   gather, progress=None, worker: dict | None = None) -> dict:
    """One unit of `ens run` inside a Ray task (`gather`: the driver's `run.gather_members`, for a teacher's cached
    probabilities): the config and data re-read from the project, the unit's keys checked
    against the driver's (a YAML or the data changed since the run began: an error, not a wrong entry), then the
    same path as a sequential run (`member_entry`). Returns the entry's key and how it was computed."""
    from .cache import MemberCache
    from .config import Project

    project = Project(Path(root))
    path, ens, comp = load_ensemble(project, spec, list(overrides))
    member = next((m for m in ens.members if m.name == member_name), None)
    data = load_data(project, comp)
    variants, _ = fold_variants(ens, data, None, project.relative(path))
    data = next((d for f, d, _ in variants if f == fold), None)
    data = member_data(project, member, data, fold, gather=gather) if member is not None and data is not None else data
    if member is None or data is None or train_key(member, data.fingerprint) != train:
        raise EnsError(f"{project.relative(path)}: member {member_name} (or its data) changed since this run began; "
                       "run again")
    cache = MemberCache(project.cache, comp.name)
    entry, how = member_entry(member, data, cache, train, key, progress, worker)
    return {"key": entry.key, "how": how}

