"""Kept member models put back to work: `ens bench` (speed and size per member) and `ens eval --on FOLDER` (e.g.
trained on CIFAR-10, evaluated on CINIC-10). Both need the members' kept weights (`keep_model: true`, the default)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ensemble
from .config import Project
from .errors import EnsError
from .run import MemberOutcome, gather_members


def gather_kept(project: Project, spec: str, overrides, what: str):
    """The ensemble's members with their weights kept; a clear error before any training when some member has
    none and will not keep any (`keep_model: false`)."""
    g = gather_members(project, spec, overrides, cached_only=True)
    lacking = [o.member.name for o in g.outcomes if not o.member.classical
               and any(u.entry.model_path is None for u in o.predictors)]
    lacking += [m.name for m in g.missing if not m.keep_model]
    if lacking:
        raise EnsError(f"{what} needs the members' weights, and {', '.join(lacking)} kept none: set keep_model: true "
                       "(e.g. `defaults.keep_model=true` on the command line); such members are then retrained once")
    return gather_members(project, spec, overrides) if g.missing else g


def kept_probs(outcome: MemberOutcome, data, paths: list) -> dict:
    """{'plain', 'tta'} probabilities of `paths` by the member's kept models, as its test predictions are made:
    the mean of a cross-validated member's fold models (or its refit)."""
    from .predict import paths_probs

    out = [paths_probs(kept_learner(unit, data), outcome.member, paths) for unit in outcome.predictors]
    return {k: np.mean([o[k] for o in out], axis=0) for k in ("plain", "tta")}


def kept_learner(outcome: MemberOutcome, data):
    """The member's Learner with its kept weights (built without downloading anything), at its final size, fp32."""
    from . import predict

    meta = outcome.entry.meta
    return predict.kept_learner(meta["member"], data, outcome.entry.model_path, meta["normalize"])[1]


@dataclass
class BenchRow:
    name: str
    arch: str
    size: object
    valid_accuracy: float
    valid_loss: float
    ms_per_image_batch1: float
    ms_per_image_batched: float
    params: int
    memory_mb: float
    disk_mb: float
    models: int = 1  # a cross-validated member predicts with k fold models: time, size and parameters are k-fold


def _ms_per_image(model, x, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats / len(x) * 1000


def bench(project: Project, spec: str, overrides=(), batch: int = 32, repeats: int = 5) -> tuple[list[BenchRow], str]:
    """Per member: validation accuracy and loss (from the cache), inference time per image with a batch of 1
    and batched on this machine's device, parameters, in-memory and on-disk size of the weights."""
    import torch

    from .train import device_precision

    g = gather_kept(project, spec, overrides, "ens bench")
    device = device_precision("fp32")[0]
    rows = []
    for o in g.outcomes:
        metrics = o.entry.meta["metrics"]
        if o.member.classical:  # no network to time: its cost is the features' and the
            ms = o.entry.meta.get("seconds_per_image", 0) * 1000  # classifier's per image, measured when trained
            rows.append(BenchRow(o.member.name, o.member.arch, o.member.final_size, metrics["plain_accuracy"],
                                 metrics["plain_log_loss"], ms, ms, 0, 0.0, 0.0, len(o.predictors)))
            continue
        k = len(o.predictors)
        learn = kept_learner(o.predictors[0], g.data)  # the fold models share one architecture: time one, count k
        model = learn.model.eval().to(device)
        h, w = (o.member.final_size,) * 2 if isinstance(o.member.final_size, int) else o.member.final_size
        one, many = torch.randn(1, 3, h, w, device=device), torch.randn(batch, 3, h, w, device=device)
        tensors = list(model.parameters()) + list(model.buffers())
        metrics = o.entry.meta["metrics"]
        rows.append(BenchRow(o.member.name, o.member.arch, o.member.final_size, metrics["plain_accuracy"],
                             metrics["plain_log_loss"], k * _ms_per_image(model, one, repeats * 4),
                             k * _ms_per_image(model, many, repeats), k * sum(p.numel() for p in model.parameters()),
                             k * sum(t.numel() * t.element_size() for t in tensors) / 1e6,
                             sum(u.entry.model_path.stat().st_size for u in o.predictors) / 1e6, k))
    return rows, device


def teachers(project: Project, spec: str, overrides=()) -> dict[str, str]:
    """{member name: its teacher's ensemble spec} for the members that learn from a cached ensemble."""
    from .config import load_ensemble

    _, ens, _ = load_ensemble(project, spec, list(overrides))
    out = {}
    for m in ens.members:
        source = m.distill or m.pseudo
        if source is not None:
            out[m.name] = source.teacher
    return out


def write_bench_csv(rows: list[BenchRow], dest: Path) -> Path:
    import csv
    from dataclasses import asdict, fields

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(BenchRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return dest


def labelled_folder(folder: Path, vocab: list[str], extensions) -> tuple[list[Path], np.ndarray]:
    """Images of `folder/<class>/*`, with their class indices in the competition's vocab."""
    if not folder.is_dir():
        raise EnsError(f"{folder}: no such folder; give a folder of class subfolders (<class>/*.jpg)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in vocab]
    if unknown:
        raise EnsError(f"{folder}: class folder '{unknown[0]}' is not a class of the competition "
                       f"({', '.join(vocab)}); rename or remove it")
    items = sorted((p, vocab.index(p.parent.name)) for c in classes for p in (folder / c).iterdir()
                   if p.is_file() and p.suffix.lower() in extensions)
    if not items:
        raise EnsError(f"{folder}: no images in its class folders")
    paths, targets = zip(*items)
    return list(paths), np.array(targets)


def evaluate_on(project: Project, spec: str, folder: Path, overrides=()):
    """Each kept member (plain and with its TTA) and the ensemble on another labelled folder with the same
    classes: {name: {metric: (on folder, on validation)}} and the number of images. The folder is checked
    first: a bad one is said before any member is trained."""
    from .data import load_data
    from .run import check_ensemble

    if not Path(folder).is_dir():
        raise EnsError(f"{folder}: no such folder; give a folder of class subfolders (<class>/*.jpg)")
    _, ens, comp = check_ensemble(project, spec, list(overrides))
    classical = [m.name for m in ens.members if m.classical]
    if classical:  # its fitted classifier is not kept: only the cached probabilities are
        raise EnsError(f"ens eval predicts new images with kept models; the classical member(s) {', '.join(classical)} "
                       "keep none: evaluate an ensemble without them")
    paths, targets = labelled_folder(Path(folder), load_data(project, comp).vocab, comp.image_extensions)
    g = gather_kept(project, spec, overrides, "ens eval")
    metric = g.competition.metric
    results, probs, weights = {}, [], []
    for o in g.outcomes:
        p = kept_probs(o, g.data, paths)
        plain, tta = p["plain"], p["tta"]
        meta = o.entry.meta["metrics"]
        results[o.member.name] = {
            "accuracy": (ensemble.accuracy(plain, targets), meta["plain_accuracy"]),
            "TTA accuracy": (ensemble.accuracy(tta, targets), meta["tta_accuracy"]),
            f"TTA {metric}": (ensemble.score(metric, tta, targets), meta.get(f"tta_{metric}")),
        }
        probs.append(tta if g.ensemble.probs == "tta" else plain)
        weights.append(o.member.weight)
    vt = g.outcomes[0].entry.arrays["valid_targets"]
    blended = ensemble.blend(g.ensemble.combine, [o.entry.probs("valid", g.ensemble.probs) for o in g.outcomes],
                             probs, vt, weights, g.blend_folds(), metric)  # a learned blend: learned on validation
    mixed, valid = blended.test, blended.valid
    results["ensemble"] = {"accuracy": (ensemble.accuracy(mixed, targets), ensemble.accuracy(valid, vt)),
                           f"TTA {metric}": (ensemble.score(metric, mixed, targets), ensemble.score(metric, valid, vt))}
    return results, len(paths), g
