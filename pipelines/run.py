"""`ens run`: config → data → (cache hit, or train → predict → cache) per member → combine → checked submission.

Returns what happened; `cli.py` prints it.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np

from . import ensemble, submission
from .cache import Entry, MemberCache, member_key
from .config import Competition, Ensemble, Member, Project, load_ensemble
from .data import CompetitionData, load_data
from .errors import EnsError
from .models import check_arch


@dataclass
class MemberOutcome:
    member: Member
    entry: Entry
    trained: bool  # False: read from the cache
    test_score: float | None = None  # on the local answers, where the competition has them


@dataclass
class RunResult:
    ensemble_path: Path
    ensemble: Ensemble
    competition: Competition
    members: list[MemberOutcome]
    metric: str
    valid_score: float
    csv: Path
    rows: int
    test_score: float | None
    delivery: submission.Delivery
    damaged: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained(self) -> list[str]:
        return [o.member.name for o in self.members if o.trained]


def check_ensemble(project: Project, spec: str, overrides: list[str]) -> tuple[Path, Ensemble, Competition]:
    """Load and validate everything a run needs before any time is spent: YAML, architectures."""
    path, ens, comp = load_ensemble(project, spec, overrides)
    for i, member in enumerate(ens.members):
        check_arch(member.arch, f"{project.relative(path)}: members[{i}].arch", member.pretrained)
    return path, ens, comp


def versions() -> dict:
    return {p: version(p) for p in ("fastai", "timm", "torch", "torchvision", "numpy")} | {"python": platform.python_version()}


def _train_and_predict(member: Member, data: CompetitionData, cache: MemberCache, key: str, progress) -> Entry:
    from .data import prepare_data
    from .predict import predict_member
    from .train import train_member

    if member.prepare:
        data = prepare_data(data, member.prepare, cache.root.parent)
    partial = cache.partial(key)  # per-epoch checkpoints of an unfinished member: a rerun resumes there
    try:
        trained = train_member(member, data, progress, checkpoint_dir=partial)
    except RuntimeError as e:
        if "input size" in str(e) or "Input image height" in str(e) or "Input height" in str(e):
            raise EnsError(f"member {member.name}: size {member.final_size} is too small or does not fit "
                           f"{member.arch} ({str(e).splitlines()[0]}); choose a larger size") from None
        raise
    probs, predict_seconds = predict_member(trained.learn, member, data, progress)
    vocab = list(trained.learn.dls.vocab)
    if vocab != data.vocab:
        raise RuntimeError(f"the learner's vocab {vocab} differs from the competition's {data.vocab}")
    targets = probs["valid_targets"]
    names = dict.fromkeys(("accuracy", "log_loss", data.competition.metric))
    metrics = {f"{kind}_{name}": ensemble.score(name, probs[f"valid_{kind}"], targets)
               for kind in ("plain", "tta") for name in names}
    per_class = {kind: ensemble.per_class(probs[f"valid_{kind}"], targets, vocab) for kind in ("plain", "tta")}
    arrays = dict(probs, valid_ids=np.array(data.valid_paths), test_ids=np.array(data.test_ids), vocab=np.array(vocab))
    extra = {}
    if member.keep_model and (partial / "checkpoint.pth").is_file():
        extra["checkpoint.pth"] = partial / "checkpoint.pth"
    if member.keep_model:
        import torch

        weights = cache.root / f".model-{key}.pth"
        cache.root.mkdir(parents=True, exist_ok=True)
        torch.save(trained.learn.model.state_dict(), weights)
        extra["model.pth"] = weights
    meta = {
        "competition": data.competition.name,
        "member": member.model_dump(mode="json"),
        "key_fields": member.key_fields(),
        "data_fingerprint": data.fingerprint,
        "metrics": metrics,
        "per_class": per_class,
        "history": trained.history,
        "timings": {"train_seconds": round(trained.seconds, 2), "predict_seconds": round(predict_seconds, 2)},
        "resumed_at": trained.resumed_at,
        "memory": trained.memory,
        "normalize": trained.normalize,
        "device": trained.device,
        "precision": trained.precision,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    entry = cache.save(key, arrays, meta, extra)
    shutil.rmtree(partial, ignore_errors=True)  # finished: its checkpoints have served
    return entry


def _check_aligned(outcomes: list[MemberOutcome]) -> None:
    """Members are averaged row by row: their ids and classes must agree (they do when keys share the data)."""
    first = outcomes[0].entry
    for o in outcomes[1:]:
        for name in ("valid_ids", "test_ids", "vocab"):
            if not np.array_equal(o.entry.arrays[name], first.arrays[name]):
                raise EnsError(f"cache entry {o.entry.key} ({o.member.name}) has other {name} than "
                               f"{first.key} ({outcomes[0].member.name}); `ens cache ls` shows both, delete one")


@dataclass
class Gathered:
    """An ensemble's members with their cache entries (trained where missing)."""

    path: Path
    ensemble: Ensemble
    competition: Competition
    data: CompetitionData
    outcomes: list[MemberOutcome]
    missing: list[Member] = field(default_factory=list)  # not cached, not trained (cached_only)
    damaged: list = field(default_factory=list)


def gather_members(project: Project, spec: str, overrides: list[str] = (), progress=None,
                   on_member=lambda outcome: None, cached_only: bool = False) -> Gathered:
    """Each member's cache entry, training the ones that are missing (unless `cached_only`)."""
    path, ens, comp = check_ensemble(project, spec, list(overrides))
    data = load_data(project, comp)
    cache = MemberCache(project.cache, comp.name)
    cache.sweep()
    outcomes, missing = [], []
    task = progress.add_task("members", total=len(ens.members)) if progress is not None else None
    for member in ens.members:
        key = member_key(member, data.fingerprint)
        if progress is not None:
            progress.update(task, description=f"member {member.name} ({member.arch})")
        entry = cache.load(key)
        if entry is None and cached_only:
            missing.append(member)
            continue
        outcome = MemberOutcome(member, entry, trained=False) if entry else \
            MemberOutcome(member, _train_and_predict(member, data, cache, key, progress), trained=True)
        outcomes.append(outcome)
        on_member(outcome)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    if outcomes:
        _check_aligned(outcomes)
    return Gathered(path, ens, comp, data, outcomes, missing, list(cache.damaged))


@dataclass
class Blend:
    csv: Path
    rows: int
    valid_score: float
    test_score: float | None
    delivery: submission.Delivery


def blend_and_submit(project: Project, g: Gathered, outcomes: list[MemberOutcome], weights: list[float],
                     name: str, probs: str, submit: bool = True, wait: bool = True, force: bool = False) -> Blend:
    """The weighted mean of `outcomes`' probabilities → a CSV checked against the sample submission, scored on
    local answers where the competition has them, uploaded to Kaggle where it has a slug (unless `submit` is
    off), and recorded in the history. A failed upload is recorded and returned, not raised: the CSV stays."""
    comp, data = g.competition, g.data
    targets = outcomes[0].entry.arrays["valid_targets"]
    valid = ensemble.combine([o.entry.probs("valid", probs) for o in outcomes], weights)
    test = ensemble.combine([o.entry.probs("test", probs) for o in outcomes], weights)
    valid_score = ensemble.score(comp.metric, valid, targets)

    out_dir = project.submissions / comp.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    csv_path = out_dir / f"{stamp}-{name}.csv"
    for n in range(2, 1000):  # two runs in one second must not overwrite each other's file
        if not csv_path.exists():
            break
        csv_path = out_dir / f"{stamp}-{name}-{n}.csv"
    sample = data.root / comp.sample_submission
    submission.write_submission(csv_path, comp, sample, data.test_ids, test, data.vocab)
    rows = submission.check_submission(csv_path, sample, comp, data.vocab)
    test_score = None
    if comp.solution:  # scored as Kaggle would: the file, against the answers; and each member alike
        solution = data.root / comp.solution
        test_score = submission.score_submission(csv_path, solution, comp)
        for o in outcomes:
            values = submission.submission_values(comp, o.entry.probs("test", probs), data.vocab)
            o.test_score = submission.score_values(data.test_ids, values, solution, comp)
    validation = {"metric": comp.metric, "score": valid_score, "probs": probs, "n_images": int(len(targets)),
                  "members": {o.member.name: w for o, w in zip(outcomes, weights)},
                  "per_class": ensemble.per_class(valid, targets, data.vocab)}
    csv_path.with_suffix(".validation.json").write_text(json.dumps(validation, indent=1))
    history = out_dir / "history.csv"
    shown = project.relative(csv_path)
    members = ", ".join(o.member.name + (f"×{w:g}" if w != 1 else "") for o, w in zip(outcomes, weights))
    message = f"ens {project.relative(g.path)}: {members}; valid {comp.metric} {valid_score:.4f}"[:500]
    if comp.kaggle and submit:
        delivery = submission.deliver_to_kaggle(comp, csv_path, shown, message, history, force, wait)
    elif comp.kaggle:
        delivery = submission.Delivery("not submitted: --no-submit", note="not uploaded (--no-submit); later: "
                                       + submission.retry_command(shown, comp.name, message))
    elif test_score is not None:
        delivery = submission.Delivery("local answers", status="scored", score=f"{test_score:.6f}")
    else:
        delivery = submission.Delivery("not submitted: the competition has no kaggle slug")
    submission.append_history(
        history, ensemble=project.relative(g.path),
        members=json.dumps({o.member.name: w for o, w in zip(outcomes, weights)}),
        keys=json.dumps([o.entry.key for o in outcomes]), metric=comp.metric, valid_score=f"{valid_score:.6f}",
        file=shown, sha256=submission.file_sha256(csv_path), destination=delivery.destination, ref=delivery.ref,
        status=delivery.status, score=delivery.score, message=message)
    return Blend(csv_path, rows, valid_score, test_score, delivery)


def run_ensemble(project: Project, spec: str, overrides: list[str] = (), progress=None,
                 on_member=lambda outcome: None, submit: bool = True, wait: bool = True, force: bool = False) -> RunResult:
    start = time.perf_counter()
    g = gather_members(project, spec, overrides, progress, on_member)
    blend = blend_and_submit(project, g, g.outcomes, [o.member.weight for o in g.outcomes], g.path.stem,
                             g.ensemble.probs, submit, wait, force)
    return RunResult(g.path, g.ensemble, g.competition, g.outcomes, g.competition.metric, blend.valid_score,
                     blend.csv, blend.rows, blend.test_score, blend.delivery, damaged=g.damaged,
                     seconds=time.perf_counter() - start)
