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
from .cache import Entry, MemberCache, prediction_key, train_key, version_drift
from .config import Competition, Ensemble, Member, Project, load_ensemble
from .data import CompetitionData, load_data
from .errors import EnsError
from .models import check_arch
from .util import file_lock, say


@dataclass
class MemberOutcome:
    member: Member
    entry: Entry
    how: str  # cached | trained | resumed | predicted (kept weights, new TTA) | derived (another beta)
    test_score: float | None = None  # on the local answers, where the competition has them

    @property
    def trained(self) -> bool:
        return self.how in ("trained", "resumed")


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
    warnings: list[str] = field(default_factory=list)

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


def _member_entry(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str,
                  progress) -> tuple[Entry, str]:
    """The member's entry, computed as cheaply as the cache allows, and how: 'derived' (the arrays of an entry
    of the same weights and passes give another beta), 'predicted' (kept weights, new TTA), 'trained' or
    'resumed'. Under the training key's lock: a second run wanting the same weights waits, then reads them."""
    waiting = lambda: say(progress)(f"{member.name}: another ens run is computing it (key {train}); "
                                    "waiting for it to finish")
    with file_lock(cache.lock(train), on_wait=waiting):
        entry = cache.load(key)
        if entry is not None:
            return entry, "cached"
        sibling = cache.tta_sibling(train, member.tta_passes) if member.tta_passes else None
        if sibling is not None:
            return _derive(member, sibling, cache, key), "derived"
        if member.prepare:
            from .data import prepare_data

            data = prepare_data(data, member.prepare, cache.root.parent)
        kept = cache.model_meta(train)
        if kept is not None:
            return _predict_kept(member, data, cache, train, key, kept, progress), "predicted"
        return _train_and_predict(member, data, cache, train, key, progress)


def _derive(member: Member, sibling: Entry, cache: MemberCache, key: str) -> Entry:
    """Another beta over the same augmented passes: a blend of cached arrays, no prediction."""
    from .cache import tta_blend

    arrays = dict(sibling.arrays)
    for split in ("valid", "test"):
        arrays[f"{split}_tta"] = tta_blend(arrays[f"{split}_aug"], arrays[f"{split}_plain"], member.tta.beta)
    meta = dict(sibling.meta, member=member.model_dump(mode="json"), key_fields=member.key_fields(),
                derived_from=sibling.key, computed="derived", created=_now())
    meta.update(_scores(arrays, sibling.vocab, sibling.meta.get("metric_names", ["accuracy", "log_loss"])))
    return cache.save(key, arrays, meta)


def _scores(probs: dict, vocab: list[str], names) -> dict:
    """Validation metrics and per-class tables of `probs`, plain and TTA."""
    targets = probs["valid_targets"]
    names = list(dict.fromkeys(["accuracy", "log_loss", *names]))
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
    arrays = dict(probs, valid_ids=np.array(data.valid_paths), test_ids=np.array(data.test_ids), vocab=np.array(vocab))
    timings = dict(trained_meta.get("timings") or {}, predict_seconds=round(predict_seconds, 2))
    meta = dict(trained_meta, member=member.model_dump(mode="json"), key_fields=member.key_fields(),
                timings=timings, created=_now(), **_scores(arrays, vocab, [data.competition.metric]))
    return cache.save(key, arrays, meta)


def _predict_kept(member, data, cache: MemberCache, train: str, key: str, kept: dict, progress) -> Entry:
    from .predict import learner_from_weights

    learn = learner_from_weights(member, data, cache.model_file(train), kept["normalize"],
                                 kept.get("precision", "fp32"))
    return _entry_from(member, data, cache, key, learn, dict(kept, computed="predicted"), progress)


def _train_and_predict(member: Member, data: CompetitionData, cache: MemberCache, train: str, key: str,
                       progress) -> tuple[Entry, str]:
    from .train import train_member

    partial = cache.partial(train)  # per-epoch checkpoints of an unfinished member: a rerun resumes there
    try:
        trained = train_member(member, data, progress, checkpoint_dir=partial)
    except RuntimeError as e:
        if "input size" in str(e) or "Input image height" in str(e) or "Input height" in str(e):
            raise EnsError(f"member {member.name}: size {member.final_size} is too small or does not fit "
                           f"{member.arch} ({str(e).splitlines()[0]}); choose a larger size") from None
        raise
    trained_meta = {
        "computed": "trained",  # or "predicted" from kept weights, or "derived" from another entry's arrays
        "competition": data.competition.name,
        "train_key": train,
        "train_fields": member.train_fields(),
        "data_fingerprint": data.fingerprint,
        "history": trained.history,
        "timings": {"train_seconds": round(trained.seconds, 2)},
        "resumed_at": trained.resumed_at,
        "memory": trained.memory,
        "normalize": trained.normalize,
        "device": trained.device,
        "precision": trained.precision,
        "threads": _threads(),
        "deterministic": trained.deterministic,
        "versions": versions(),
    }
    if member.keep_model:  # what a TTA change, `ens eval`, `ens bench` and code competitions need
        cache.save_model(train, trained.learn.model.state_dict(), dict(trained_meta, created=_now()))
    entry = _entry_from(member, data, cache, key, trained.learn, trained_meta, progress)
    shutil.rmtree(partial, ignore_errors=True)  # finished: its checkpoints have served
    return entry, "resumed" if trained.resumed_at else "trained"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


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
    warnings: list[str] = field(default_factory=list)  # one line each, shown before the results


def gather_members(project: Project, spec: str, overrides: list[str] = (), progress=None,
                   on_member=lambda outcome: None, cached_only: bool = False) -> Gathered:
    """Each member's cache entry, computing the ones that are missing (unless `cached_only`): first every key and
    cache look-up, then the checks that can fail before any training time is spent, then the work."""
    path, ens, comp = check_ensemble(project, spec, list(overrides))
    data = load_data(project, comp)
    cache = MemberCache(project.cache, comp.name)
    cache.sweep()
    warnings = _warnings(ens)
    planned = []  # (member, training key, key, entry or None)
    for member in ens.members:
        train = train_key(member, data.fingerprint)
        key = prediction_key(train, member)
        entry = cache.load(key)
        planned.append((member, train, key, entry))
        drift = version_drift(entry.meta) if entry is not None else []
        if drift:
            warnings.append(f"{member.name}: cached with {', '.join(drift)}; its probabilities stand, but a "
                            "retrain would not reproduce them exactly (`ens cache ls` shows the versions)")
    missing = [m for m, _, _, e in planned if e is None]
    if missing and not cached_only:
        _check_before_training(missing, data)
    outcomes, left_out = [], []
    task = progress.add_task("members", total=len(ens.members)) if progress is not None else None
    for member, train, key, entry in planned:
        if progress is not None:
            progress.update(task, description=f"member {member.name} ({member.arch})")
        if entry is None and cached_only:
            left_out.append(member)
            continue
        how = "cached"
        if entry is None:
            entry, how = _member_entry(member, data, cache, train, key, progress)
        outcome = MemberOutcome(member, entry, how)
        outcomes.append(outcome)
        on_member(outcome)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    if outcomes:
        _check_aligned(outcomes)
    return Gathered(path, ens, comp, data, outcomes, left_out, list(cache.damaged), warnings)


def _warnings(ens: Ensemble) -> list[str]:
    out = []
    for m in ens.members:
        if m.tta.n and not m.tta_passes:
            out.append(f"{m.name}: tta.n {m.tta.n} with aug_transforms: null would repeat the plain pass "
                       f"{m.tta.n} times; skipped (TTA is the plain pass; set aug_transforms, or resize.method: crop)")
    return out


def _check_before_training(members: list[Member], data: CompetitionData) -> None:
    """What would fail only after minutes of training, checked first: every member's sizes fit its network."""
    from .models import check_input_size

    for member in members:
        check_input_size(member, len(data.vocab))


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
    off), and recorded in the history. A failed upload is recorded and returned, not raised: the CSV stays.
    The CSV's name `<stamp>-<name>.csv` is reserved atomically (`-2`, `-3`, ... when taken), so concurrent runs
    of one ensemble never share a file."""
    comp, data = g.competition, g.data
    targets = outcomes[0].entry.arrays["valid_targets"]
    valid = ensemble.combine([o.entry.probs("valid", probs) for o in outcomes], weights)
    test = ensemble.combine([o.entry.probs("test", probs) for o in outcomes], weights)
    valid_score = ensemble.score(comp.metric, valid, targets)

    out_dir = project.submissions / comp.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    csv_path = submission.reserve_csv(out_dir, f"{stamp}-{name}")  # created atomically: two runs, two files
    sample = data.root / comp.sample_submission
    try:
        submission.write_submission(csv_path, comp, sample, data.test_ids, test, data.vocab)
    except BaseException:
        csv_path.unlink(missing_ok=True)  # the reserved name, still empty
        raise
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
    record = dict(ensemble=project.relative(g.path),
                  members=json.dumps({o.member.name: w for o, w in zip(outcomes, weights)}),
                  keys=json.dumps([o.entry.key for o in outcomes]), metric=comp.metric, valid_score=f"{valid_score:.6f}")
    if comp.kaggle and submit:  # records its row itself, as the upload goes (pending before the score wait)
        delivery = submission.deliver_to_kaggle(comp, csv_path, shown, message, history, force, wait, record=record)
        return Blend(csv_path, rows, valid_score, test_score, delivery)
    if comp.kaggle:
        delivery = submission.Delivery("not submitted: --no-submit", note="not uploaded (--no-submit); later: "
                                       + submission.retry_command(shown, comp.name, message))
    elif test_score is not None:
        delivery = submission.Delivery("local answers", status="scored", score=f"{test_score:.6f}")
    else:
        delivery = submission.Delivery("not submitted: the competition has no kaggle slug")
    delivery.row_id = submission.append_history(
        history, **record, file=shown, sha256=submission.file_sha256(csv_path), destination=delivery.destination,
        ref=delivery.ref, status=delivery.status, score=delivery.score, message=message)
    return Blend(csv_path, rows, valid_score, test_score, delivery)


def run_ensemble(project: Project, spec: str, overrides: list[str] = (), progress=None,
                 on_member=lambda outcome: None, submit: bool = True, wait: bool = True, force: bool = False) -> RunResult:
    start = time.perf_counter()
    g = gather_members(project, spec, overrides, progress, on_member)
    blend = blend_and_submit(project, g, g.outcomes, [o.member.weight for o in g.outcomes], g.path.stem,
                             g.ensemble.probs, submit, wait, force)
    return RunResult(g.path, g.ensemble, g.competition, g.outcomes, g.competition.metric, blend.valid_score,
                     blend.csv, blend.rows, blend.test_score, blend.delivery, damaged=g.damaged, warnings=g.warnings,
                     seconds=time.perf_counter() - start)
