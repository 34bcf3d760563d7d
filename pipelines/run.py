"""`ens run`: config → data → (cache hit, or train → predict → cache) per member → combine → checked submission.

Returns what happened; `cli/` prints it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import ensemble, submission, unit
from .cache import Entry, MemberCache, prediction_key, train_key, version_drift
from .clock import RUN_CLOCK, RunClock, unit_work
from .config import Combine, Competition, Ensemble, Member, Project, load_ensemble
from .config.loading import ignored_warnings
from .crossval import costliest, join_folds, unit_name
from .data import CompetitionData, load_data
from .errors import EnsError
from .models import arch_problem
from .notebook.bundle import Chosen
from .unit import compute_member, fold_variants, member_entry, member_scores
from .util import cache_in_use, process_seconds, unique_suffix

if TYPE_CHECKING:
    from .schedule import Parallel


@dataclass
class MemberOutcome:
    member: Member
    entry: Entry
    how: str  # cached | trained | resumed | predicted (kept weights, new TTA) | derived (another beta)
    test_score: float | None = None  # on the local answers, where the competition has them
    fold: int | str | None = None  # a fold model of a cross-validated member: its fold, or 'refit'
    folds: list["MemberOutcome"] = field(default_factory=list)  # a cross-validated member: its fold models

    @property
    def trained(self) -> bool:
        return self.how in ("trained", "resumed")

    def fold_scores(self, name: str) -> list[float]:
        """A cross-validated member's metric `name` ('tta_accuracy', ...) on each fold, from its fold models'
        entries (the refit has none: it saw every image); [] for a holdout member."""
        return [u.entry.meta["metrics"][name] for u in self.folds
                if u.fold != "refit" and name in (u.entry.meta.get("metrics") or {})]

    @property
    def predictors(self) -> list["MemberOutcome"]:
        """The models whose mean predicts the test images: this one; or a cross-validated member's refit, else
        its fold models."""
        if not self.folds:
            return [self]
        refit = [u for u in self.folds if u.fold == "refit"]
        return refit or self.folds


@dataclass
class RunResult:
    ensemble_path: Path
    ensemble: Ensemble
    competition: Competition
    members: list[MemberOutcome]
    metric: str
    valid_score: float | None  # None when a cross-validated member's folds are incomplete (--folds): no blend
    csv: Path | None
    rows: int
    test_score: float | None
    delivery: submission.Delivery | None
    damaged: list = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    gathered: Gathered | None = None
    blended: ensemble.Blended | None = None
    unchanged: str = ""  # a rerun that would write the same CSV: the line naming the one already written

    @property
    def trained(self) -> list[str]:
        return [o.member.name for o in self.members if o.trained]


def check_ensemble(project: Project, spec: str, overrides: list[str]) -> tuple[Path, Ensemble, Competition]:
    """Load and validate everything a run needs before any time is spent: YAML, architectures."""
    return load_ensemble(project, spec, overrides, arch_problem=arch_problem)




@dataclass
class Gathered:
    """An ensemble's members with their cache entries (trained where missing). In a cross-validated ensemble,
    each member's entry joins its fold models' (`crossval.join_folds`): its validation rows are every training
    image, out of fold."""

    path: Path
    ensemble: Ensemble
    competition: Competition
    data: CompetitionData
    outcomes: list[MemberOutcome]
    missing: list[Member] = field(default_factory=list)  # not cached, not trained (cached_only)
    damaged: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, shown before the results
    fold_ids: list[int] | None = None  # cv: each training image's fold
    incomplete: dict = field(default_factory=dict)  # cv: member name -> its fold models not computed yet
    units: list[MemberOutcome] = field(default_factory=list)  # every model read or computed (fold models in cv)
    # seconds before any member's work: imports_s (process start to here), data_s (listing and fingerprint)
    startup: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the command line's, recorded with the run

    @property
    def cv(self) -> bool:
        return self.fold_ids is not None

    def blend_folds(self) -> np.ndarray:
        """The folds a learned blend is scored over by nested cross-validation: the cross-validation folds of
        the OOF rows, or stratified parts of the holdout."""
        arrays = self.outcomes[0].entry.arrays
        if "valid_folds" in arrays:
            return arrays["valid_folds"]
        from .crossval import holdout_parts

        return holdout_parts(arrays["valid_ids"], arrays["valid_targets"], self.competition.split.seed,
                             groups=self.valid_groups())

    def valid_groups(self) -> np.ndarray | None:
        """Each validation (or out-of-fold) row's group (`cv.group_column`), None when the competition has none:
        nested-CV parts and the bootstrap then keep or draw whole groups."""
        comp = self.competition
        if not comp.cv.group_column:
            return None
        from .data import read_groups

        ids = [str(i) for i in self.outcomes[0].entry.arrays["valid_ids"]]
        return np.asarray(read_groups(comp, self.data.root, ids))




@dataclass
class _Planned:
    member: Member
    fold: int | str | None
    data: CompetitionData
    train: str
    key: str
    entry: Entry | None
    compute: bool  # computed when missing (else only read: --cached-only, or a fold outside --folds)
    how: str = "cached"  # how `entry` came: cached, or kaggle (trained in a notebook during this run)


def _check_aligned(outcomes: list[MemberOutcome]) -> None:
    """Members are averaged row by row: their ids and classes must agree (they do when keys share the data)."""
    first = outcomes[0].entry
    for o in outcomes[1:]:
        for name in ("valid_ids", "test_ids", "vocab"):
            if not np.array_equal(o.entry.arrays[name], first.arrays[name]):
                raise EnsError(f"cache entry {o.entry.key} ({o.member.name}) has other {name} than "
                               f"{first.key} ({outcomes[0].member.name}); `ens cache ls` shows both, delete one")


def member_data(project: Project, member: Member, data: CompetitionData, fold, seen: tuple = ()) -> CompetitionData:
    """`unit.member_data` with this driver gathering the teacher ensembles it reads (pseudo-labels, distillation)."""
    return unit.member_data(project, member, data, fold, seen, gather=gather_members)


def gather_members(project: Project, *args, **kwargs) -> Gathered:
    """`_gather_members` with the project's cache held in use (shared): `ens cache prune` deletes no decoded copy,
    entry or kept weights while a run reads or writes them."""
    with cache_in_use(project.cache):
        return _gather_members(project, *args, **kwargs)


def _gather_members(project: Project, spec: str, overrides: list[str] = (), progress=None,
                   on_member=lambda outcome: None, cached_only: bool = False,
                   folds: list[int] | None = None, parallel: "Parallel | None" = None, seen: tuple = (),
                   remote: dict | None = None) -> Gathered:
    """Each member's cache entry, computing the ones that are missing (unless `cached_only`; in cv, only the
    folds in `folds` when given): first every key and cache look-up, then the checks that can fail before any
    training time is spent, then the work — in this process, or with `parallel` as Ray tasks
    (`unit.compute_member`), or with `remote` ({"target": remote.gpus.Target, ...}) in Kaggle notebooks, whose
    keys are planned as they resolve there (`remote.runs.train_on_kaggle`). `on_member` hears of every model
    (each fold model in cv)."""
    startup = {"imports_s": round(process_seconds(), 3)}
    path, ens, comp = check_ensemble(project, spec, list(overrides))
    listing = time.perf_counter()
    data = load_data(project, comp)
    startup["data_s"] = round(time.perf_counter() - listing, 3)
    cache = MemberCache(project.cache, comp.name)
    cache.sweep()
    warnings = config_warnings(ens, list(overrides))
    variants, fold_ids = fold_variants(ens, data, folds, project.relative(path))
    planned: list[_Planned] = []
    with _keys_as_on(remote):
        _plan_units(project, ens, variants, cache, cached_only, seen, planned, warnings)
    to_compute = [u for u in planned if u.entry is None and u.compute]
    if to_compute:
        _check_before_training(list({id(u.member): u.member for u in to_compute}.values()), data)
    if remote is not None and to_compute:
        to_compute = _compute_on_kaggle(project, path, list(overrides), comp, to_compute, cache, remote, warnings)
    task = progress.add_task("members", total=len(to_compute) + sum(u.entry is not None for u in planned)) \
        if progress is not None else None
    computed: dict[int, MemberOutcome] = {}

    def done(u: _Planned, entry: Entry, how: str) -> None:
        computed[id(u)] = outcome = MemberOutcome(u.member, entry, how, fold=u.fold)
        on_member(outcome)
        if progress is not None:
            progress.advance(task)

    clock = RunClock([(u.member.arch, unit_work(u.member, sum(not v for v in u.data.is_valid))) for u in to_compute])
    if parallel is not None and to_compute:  # the cached first, then the missing ones as Ray finishes them
        for u in planned:
            if u.entry is not None:
                done(u, u.entry, u.how)
        _compute_on_ray(project, path, list(overrides), to_compute, parallel, cache, progress, done, warnings)
    for u in planned:
        if id(u) in computed or (u.entry is None and not u.compute):
            continue
        fold = "" if u.fold is None else f" {unit_name(u.fold)}"
        if progress is not None:
            progress.update(task, description=f"member {u.member.name} ({u.member.arch}){fold}")
        if u.entry is not None:
            done(u, u.entry, u.how)
            continue
        clock.start(u.member.arch, unit_work(u.member, sum(not v for v in u.data.is_valid)), member=u.member.name,
                    fold=u.fold, label=f"{u.member.name} ({u.member.arch}){fold}")
        token = RUN_CLOCK.set(clock)  # the epoch lines' ETA of the run
        try:
            done(u, *member_entry(u.member, u.data, cache, u.train, u.key, progress))
        finally:
            RUN_CLOCK.reset(token)
    if progress is not None:
        progress.remove_task(task)
    units = [computed[id(u)] for u in planned if id(u) in computed]
    outcomes, left_out, incomplete = _by_member(ens, units, variants, data, fold_ids)
    if outcomes:
        _check_aligned(outcomes)
    return Gathered(path, ens, comp, data, outcomes, left_out, list(cache.damaged), warnings, fold_ids,
                    incomplete, units, startup=startup, overrides=list(overrides))


def _plan_units(project: Project, ens: Ensemble, variants, cache: MemberCache, cached_only: bool, seen: tuple,
                planned: list[_Planned], warnings: list[str]) -> None:
    """Every (member, fold) unit with its keys and cache look-up, appended to `planned`."""
    for member in ens.members:
        drift = []
        for fold, d, compute in variants:
            d = member_data(project, member, d, fold, seen)
            train = train_key(member, d.fingerprint)
            key = prediction_key(train, member)
            entry = cache.load(key)
            planned.append(_Planned(member, fold, d, train, key, entry, compute and not cached_only))
            drift = drift or (version_drift(entry.meta) if entry is not None else [])
        if drift:
            warnings.append(f"{member.name}: cached with {', '.join(drift)}; its probabilities stand, but a "
                            "retrain would not reproduce them exactly (`ens cache ls` shows the versions)")


def _keys_as_on(remote: dict | None):
    """Keys planned as they resolve where the units will train (a Kaggle GPU's precision), or here."""
    from .device import assumed

    return assumed(remote["target"].gpu.facts if remote else None)


def _compute_on_kaggle(project: Project, path: Path, overrides: list[str], comp: Competition, todo: list[_Planned],
                       cache: MemberCache, remote: dict, warnings: list[str]) -> list[_Planned]:
    """The units `todo` trained in Kaggle notebooks (`remote.runs`); those that came back are entries now ('kaggle'),
    and nothing is left to compute here. Units that did not come back: one line naming each and why."""
    from .remote.runs import train_on_kaggle

    notes = train_on_kaggle(project, comp, path, overrides, todo, **remote)
    lacking = []
    for u in todo:
        u.entry = cache.load(u.key)
        if u.entry is None:
            lacking.append(u.member.name + ("" if u.fold is None else f" {unit_name(u.fold)}"))
        else:
            u.how = "kaggle"
    if lacking:
        raise EnsError(f"{len(lacking)} unit(s) did not come back from Kaggle ({', '.join(lacking)}): "
                       f"{'; '.join(notes) or f'see submissions/{comp.name}/kaggle-runs.csv'}; run the same command again to send them again "
                       "(a unit stopped by the time limit resumes from its checkpoint)")
    return []


def _compute_on_ray(project: Project, path: Path, overrides: list[str], todo: list[_Planned], parallel: "Parallel",
                    cache: MemberCache, progress, done, warnings: list[str]) -> None:
    """The missing units as Ray tasks; each finished one read back from the cache by its key and passed to
    `done`. A unit whose worker died and was retried is named in `warnings`."""
    from .schedule import Connection, Unit, run_units

    units = [Unit(u.member.name + ("" if u.fold is None else f" {unit_name(u.fold)}"), compute_member,
                  (str(project.root), str(path), overrides, u.member.name, u.fold, u.train, u.key, gather_members))
             for u in todo]
    planned = {unit.label: u for unit, u in zip(units, todo)}

    def finished(unit: Unit) -> None:
        entry = cache.load(unit.result["key"])
        if entry is None:
            raise EnsError(f"{unit.label}: its Ray task wrote cache entry {unit.result['key']}, but {cache.root} does "
                           "not hold it: every node must see the project folder at the same path")
        done(planned[unit.label], entry, unit.result["how"])
        if len(unit.starts) > 1:
            where = entry.meta.get("resumed_at")
            warnings.append(f"{unit.label}: its Ray worker died {len(unit.starts) - 1} time(s) and Ray retried it"
                            + (f" (resumed at {where})" if where else ""))

    with Connection(parallel) as conn:
        run_units(conn, units, progress, finished)


def _by_member(ens: Ensemble, units: list[MemberOutcome], variants, data: CompetitionData, fold_ids):
    """(one outcome per member with every model it needs, members left out, cv: {member: folds missing})."""
    if fold_ids is None:
        done = {o.member.name for o in units}
        return units, [m for m in ens.members if m.name not in done], {}
    outcomes, incomplete = [], {}
    for member in ens.members:
        mine = {o.fold: o for o in units if o.member.name == member.name}
        lacking = [f for f, _, _ in variants if f not in mine]
        if lacking:
            incomplete[member.name] = lacking
            continue
        folds = {f: o.entry for f, o in mine.items() if f != "refit"}
        refit = mine["refit"].entry if "refit" in mine else None
        try:
            entry = join_folds(data, fold_ids, folds, refit, member_scores)
        except ValueError as e:
            raise EnsError(f"member {member.name}: its fold models do not fit together ({e}); "
                           "`ens cache ls` shows them: delete them and run again") from None
        outcomes.append(MemberOutcome(member, entry, costliest([o.how for o in mine.values()]),
                                      folds=[mine[f] for f, _, _ in variants]))
    return outcomes, [m for m in ens.members if m.name in incomplete], incomplete


def config_warnings(ens: Ensemble, overrides: list[str] = ()) -> list[str]:
    """What the YAML (and overrides) ask that will not happen as written, one line each (`ens validate`, `plan`
    and `run` show them)."""
    out = ignored_warnings(ens, overrides)
    for m in ens.members:
        if m.tta.n and not m.tta_passes:
            out.append(f"{m.name}: tta.n {m.tta.n} with aug_transforms: null would repeat the plain pass "
                       f"{m.tta.n} times; skipped (TTA is the plain pass; set aug_transforms, or resize.method: crop)")
    return out


def _check_before_training(members: list[Member], data: CompetitionData) -> None:
    """What would fail only after minutes of training, checked first: every member's sizes fit its network."""
    from .models import check_input_size, hub_offline, missing_weights, weights_fixes

    missing = missing_weights(members) if hub_offline() else []
    if missing:  # the hub would refuse at the first of them, after the members before it trained
        raise EnsError(f"pretrained weights not in the local cache, and HF_HUB_OFFLINE forbids fetching them: "
                       f"{_weights_list(missing)}; {weights_fixes()}")
    training = sum(not v for v in data.is_valid)
    for member in members:
        if not member.classical:  # no network to check
            check_input_size(member, len(data.vocab))
            if member.batch_size > training:  # fastai drops the last partial batch: not one step would be taken
                raise EnsError(f"member {member.name}: batch_size {member.batch_size} is more than the {training} "
                               f"training images, so no training step would run (fastai drops the last partial "
                               f"batch); set members.{member.name}.batch_size={max(1, training // 2)} or less")


def _weights_list(missing) -> str:
    return ", ".join(f"{name} ({arch}: {source})" for name, arch, source in missing)


def weights_notes(ens: Ensemble) -> list[str]:
    """Which members' pretrained weights are not available locally (`ens validate`, `ens plan`): fetched at
    their first training, or, offline, its failure."""
    from .models import hub_offline, missing_weights, weights_fixes

    missing = missing_weights(ens.members)
    if not missing:
        return []
    if hub_offline():
        return [f"pretrained weights not in the local cache, and HF_HUB_OFFLINE forbids fetching them (ens run "
                f"will stop before training): {_weights_list(missing)}; {weights_fixes()}"]
    return [f"pretrained weights not in the local cache, downloaded when first trained: {_weights_list(missing)}"]


@dataclass
class Blend:
    csv: Path
    rows: int
    valid_score: float  # the score to trust: nested CV for a learned blend, else the validation (OOF) score
    test_score: float | None
    delivery: submission.Delivery
    blended: ensemble.Blended | None = None
    unchanged: str = ""  # "unchanged: <csv> (written at ...)" when an earlier run wrote this very CSV


def _deliver(project: Project, g: Gathered, chosen, csv_path: Path, shown: str, message: str, history: Path,
             record: dict, submit: bool, push: bool, wait: bool, force: bool, notebook: dict) -> submission.Delivery:
    """A CSV upload, or for a code competition the notebook pushed (and with `submit`, submitted)."""
    from . import kaggle
    from .notebook import push as notebooks

    comp = g.competition
    try:
        as_notebook = notebooks.takes_notebooks(comp)
    except kaggle.KaggleError as e:
        destination = f"not submitted: {e.reason}"
        row_id = submission.append_history(history, **record, file=shown, sha256=submission.file_sha256(csv_path),
                                           destination=destination, message=message)
        return submission.Delivery(destination, error=f"cannot tell how '{comp.kaggle}' takes submissions ({e}); set "
                                   f"`submission: csv` or `notebook` in competitions/{comp.name}.yaml", row_id=row_id)
    if as_notebook:
        return notebooks.deliver(project, g, chosen, csv_path, shown, message, history, record, submit, wait,
                                 force=force, **notebook)
    if push:
        raise EnsError(f"competitions/{comp.name}.yaml: '{comp.kaggle}' takes CSV uploads (submission: "
                       f"{comp.submission}), not notebooks: `ens run` uploads its CSV; set `submission: notebook` "
                       "for a code competition")
    # records its row itself, as the upload goes (pending before the score wait)
    return submission.deliver_to_kaggle(comp, csv_path, shown, message, history, force, wait, record=record)


def blend_and_submit(project: Project, g: Gathered, outcomes: list[MemberOutcome], weights: list[float],
                     name: str, probs: str, submit: bool = True, wait: bool = True, force: bool = False,
                     combine: Combine | None = None, push: bool = False, notebook: dict | None = None,
                     held: str | None = None) -> Blend:
    """`outcomes`' probabilities blended as `combine` says (default: their weighted mean) → a CSV checked against
    the sample submission, scored on local answers where the competition has them, uploaded to Kaggle where it
    has a slug (unless `submit` is off; a code competition's notebook is pushed and submitted instead: `push`
    pushes it without submitting, `notebook` holds `notebook.push.deliver`'s options), and recorded in the
    history with its honest validation score (nested CV of a learned blend: `greedy`, `subset`, ...). A failed
    upload is recorded and returned, not raised: the CSV stays. The CSV's name `<stamp>-<name>.csv` is reserved
    atomically (`-2`, `-3`, ... when taken), so concurrent runs of one ensemble never share a file."""
    comp, data = g.competition, g.data
    combine = combine or Combine()
    targets = outcomes[0].entry.arrays["valid_targets"]
    blended = ensemble.blend(combine, [o.entry.probs("valid", probs) for o in outcomes],
                             [o.entry.probs("test", probs) for o in outcomes], targets, weights, g.blend_folds(),
                             comp.metric)
    valid, test, valid_score = blended.valid, blended.test, blended.honest
    per_fold = blended.per_fold

    out_dir = project.submissions / comp.name
    history = out_dir / "history.csv"
    run_hash = submission.run_hash(g.ensemble, comp, name, probs, combine, weights)
    keys = json.dumps([[u.entry.key for u in o.folds] if o.folds else o.entry.key for o in outcomes])
    sample = data.root / comp.sample_submission
    prior = submission.unchanged_csv(history, project.root, run_hash, keys)
    if prior is not None and not _same_csv(prior, valid_score, comp, sample, data, test, out_dir):
        prior = None  # same keys, other probabilities (a member retrained under its key) or another sample
    if prior is not None:  # the same resolved ensemble on the same cached members: the same CSV, already written
        csv_path = prior["path"]
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        csv_path = submission.reserve_csv(out_dir, f"{stamp}-{name}")  # created atomically: two runs, two files
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
    validation = {"metric": comp.metric, "score": valid_score, "in_sample": blended.in_sample,
                  "scored_on": "out-of-fold" if g.cv else "holdout", "combine": combine.model_dump(),
                  "honest": "nested cross-validation" if blended.learned else "as blended",
                  "per_fold": per_fold, "learned_weights": blended.weights if blended.learned else None,
                  "probs": probs, "n_images": int(len(targets)),
                  "members": {o.member.name: w for o, w in zip(outcomes, weights)},
                  "per_class": ensemble.per_class(valid, targets, data.vocab),
                  "overrides": list(g.overrides), "ensemble_hash": run_hash}
    shown = project.relative(csv_path)
    overrides = submission.shown_overrides(g.overrides)
    members = ", ".join(o.member.name + (f"×{w:g}" if w != 1 else "") for o, w in zip(outcomes, weights))
    how = (f"{combine.method}, " if combine.method != "mean" else "") + ("OOF " if g.cv else "valid ")
    message = (f"ens {project.relative(g.path)}{' ' + overrides if overrides else ''} #{run_hash[:8]}: {members}; "
               f"{how}{comp.metric} {valid_score:.4f}")[:500]
    record = dict(ensemble=project.relative(g.path),
                  members=json.dumps({o.member.name: w for o, w in zip(outcomes, weights)}),
                  keys=keys, metric=comp.metric, valid_score=f"{valid_score:.6f}", overrides=overrides,
                  ensemble_hash=run_hash)
    if prior is not None:
        unchanged = f"unchanged: {project.shown(csv_path)} (written at {prior['time'][:19].replace('T', ' ')})"
        uploaded = comp.kaggle and (submit or push) and (
            force or submission.already_submitted(history, prior["sha256"]) is None)
        if not uploaded:  # nothing new to record: no CSV, no history row
            delivery = submission.Delivery("unchanged", note=_prior_delivery(prior))
            return Blend(csv_path, rows, valid_score, test_score, delivery, blended, unchanged)
        delivery = _deliver(project, g, Chosen(name, outcomes, weights, combine, probs), csv_path, shown, message,
                            history, record, submit, push, wait, force, notebook or {})  # not sent yet: send it now
        return Blend(csv_path, rows, valid_score, test_score, delivery, blended, unchanged)
    csv_path.with_suffix(".validation.json").write_text(json.dumps(validation, indent=1))
    if comp.kaggle and (submit or push):  # records its row itself, as the delivery goes
        delivery = _deliver(project, g, Chosen(name, outcomes, weights, combine, probs), csv_path, shown, message,
                            history, record, submit, push, wait, force, notebook or {})
        return Blend(csv_path, rows, valid_score, test_score, delivery, blended)
    if comp.kaggle:
        later = (f"ens kaggle push {project.relative(g.path)} --submit" if comp.submission == "notebook"
                 else submission.retry_command(project.shown(csv_path), comp.name, message))
        if held:  # why a run that did not say --no-submit was not uploaded
            delivery = submission.Delivery("not submitted: overrides", note=f"not submitted: {held}; later: {later}")
        else:
            delivery = submission.Delivery("not submitted: --no-submit",
                                           note=f"not uploaded (--no-submit); later: {later}")
    elif test_score is not None:
        delivery = submission.Delivery("local answers", status="scored", score=f"{test_score:.6f}")
    else:
        delivery = submission.Delivery("not submitted: the competition has no kaggle slug")
    delivery.row_id = submission.append_history(
        history, **record, file=shown, sha256=submission.file_sha256(csv_path), destination=delivery.destination,
        ref=delivery.ref, status=delivery.status, score=delivery.score, message=message)
    return Blend(csv_path, rows, valid_score, test_score, delivery, blended)


def _same_csv(prior: dict, valid_score: float, comp, sample: Path, data, test, out_dir: Path) -> bool:
    """Whether this blend writes exactly the bytes of the earlier CSV, with its validation score: equal keys alone
    do not say it (a member retrained under its key after its entry went, on other threads or another card; the
    sample submission edited)."""
    if abs(float(prior.get("valid_score") or "nan") - valid_score) > 5e-7:
        return False
    probe = out_dir / f".unchanged{unique_suffix()}.csv"
    try:
        submission.write_submission(probe, comp, sample, data.test_ids, test, data.vocab)
        return submission.file_sha256(probe) == prior.get("sha256")
    finally:
        probe.unlink(missing_ok=True)


def _prior_delivery(row: dict) -> str:
    """What became of the CSV an unchanged rerun points at, as its history row says."""
    if row.get("destination") == "kaggle" and row.get("ref"):
        return f"already submitted as ref {row['ref']} ({row.get('status') or 'pending'} {row.get('score') or ''})".rstrip()
    return ""


def run_ensemble(project: Project, spec: str, overrides: list[str] = (), progress=None,
                 on_member=lambda outcome: None, submit: bool = True, wait: bool = True, force: bool = False,
                 folds: list[int] | None = None, parallel: "Parallel | None" = None, push: bool = False,
                 notebook: dict | None = None, held: str | None = None, remote: dict | None = None,
                 track: bool = False) -> RunResult:
    """Gather the members (training what is missing; in cv only `folds` when given), blend them as the
    ensemble's `combine:` says, write, check, score and submit the CSV. When some member's fold models are
    missing (a quick look at a few folds) there is no out-of-fold blend: the result has no CSV and says so. `held`:
    why a run not told --no-submit is not uploaded (its overrides), said where the upload would be.
    Tracked in MLflow with `track` or the ensemble's `tracking: mlflow` (`tracking.Tracker`)."""
    tracker = _tracker(project, spec, list(overrides), track)
    if tracker is None:
        return _run(project, spec, overrides, progress, on_member, submit, wait, force, folds, parallel, push, notebook,
                    held, remote)
    from .clock import EPOCH_WATCHERS

    token = EPOCH_WATCHERS.set((*EPOCH_WATCHERS.get(), tracker.epoch))  # each epoch logged as it ends
    try:
        result = _run(project, spec, overrides, progress, on_member, submit, wait, force, folds, parallel, push,
                      notebook, held, remote)
        tracker.results(result)
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        EPOCH_WATCHERS.reset(token)
    tracker.end("FINISHED")
    return result


def _tracker(project: Project, spec: str, overrides: list[str], track: bool):
    """The run's MLflow run, opened (params logged) before any work; None when not tracked."""
    path, ens, comp = load_ensemble(project, spec, overrides)
    if not (track or ens.tracking == "mlflow"):
        return None
    from .tracking import Tracker

    digest = submission.run_hash(ens, comp, path.stem)  # what `ens run` records in the history for this run
    shown = project.relative(path)
    tracker = Tracker(project.root, comp.name, f"{path.stem} #{digest[:8]}",
                      {"ens.ensemble": shown, "ens.ensemble_hash": digest, "ens.competition": comp.name,
                       "ens.overrides": submission.shown_overrides(overrides)})
    tracker.params(ens, overrides, {"ensemble": shown, "ensemble_hash": digest})
    return tracker


def _run(project, spec, overrides, progress, on_member, submit, wait, force, folds, parallel, push,
         notebook, held, remote) -> RunResult:
    start = time.perf_counter()
    g = gather_members(project, spec, overrides, progress, on_member, folds=folds, parallel=parallel, remote=remote)
    done = dict(damaged=g.damaged, warnings=g.warnings, gathered=g)
    if g.incomplete:
        return RunResult(g.path, g.ensemble, g.competition, g.outcomes, g.competition.metric, None, None, 0, None,
                         None, seconds=time.perf_counter() - start, **done)
    blend = blend_and_submit(project, g, g.outcomes, [o.member.weight for o in g.outcomes], g.path.stem,
                             g.ensemble.probs, submit, wait, force, g.ensemble.combine, push, notebook,
                             held=held)
    return RunResult(g.path, g.ensemble, g.competition, g.outcomes, g.competition.metric, blend.valid_score,
                     blend.csv, blend.rows, blend.test_score, blend.delivery, seconds=time.perf_counter() - start,
                     blended=blend.blended, unchanged=blend.unchanged, **done)
