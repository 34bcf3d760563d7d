"""`ens tune ENSEMBLE MEMBER`: a hyperparameter search for one member with Optuna.

The member's `tune:` (its own or from `defaults:`) declares the budget and the space: `trials` trials of `epochs`
epochs each, on a stratified `fraction` of the training images; every trial is scored with the competition's
metric on the competition's fixed validation images (plain predictions, no TTA), after every epoch, and a median
pruner stops trials that trail the earlier ones. TPE (Bayesian optimisation) proposes the values. In a
cross-validated ensemble (`validation: cv`) the trials are scored on one fold of the competition's cv (fold 0
unless told) and train on the others: a trial costs one model, as in holdout, not one per fold.

The study lives in SQLite in the cache (`cache/<competition>/.tune/<ensemble>-<member>.db`), named by a hash of
everything that defines a trial but the sampled values: an interrupted search resumes where it stopped, and
asking for more trials runs only the new ones. Trials write no cache entries.

optuna, torch and fastai are imported inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import (Competition, Ensemble, Member, Project, Tune, TuneRange, apply_overrides, read_yaml,
                     write_ensemble)
from .data import CompetitionData, cv_folds, fold_data, load_data, prepare_data, train_fraction
from .errors import ConfigError, EnsError

if TYPE_CHECKING:
    from .schedule import Parallel


class InvalidTrial(Exception):
    """The sampled values make no valid member (e.g. a size above `prepare.max_size`): the trial fails, the
    search goes on."""


@dataclass
class TrialRow:
    number: int
    state: str  # complete | pruned | failed | running
    params: dict[str, Any]  # member field path → value
    value: float | None  # the objective (complete trials); for pruned ones the last reported value
    epochs: int  # epochs scored
    seconds: float | None = None
    error: str | None = None


@dataclass
class TuneResult:
    ensemble_path: Path
    overrides: list[str]
    ensemble: Ensemble
    competition: Competition
    member: Member  # as the YAML declares it (with overrides)
    tune: Tune
    metric: str
    direction: str  # maximize | minimize
    storage: Path
    study_name: str
    trials: list[TrialRow]
    ran: int  # trials run by this call (the others were found in the study)
    target: int  # finished trials wanted (complete + pruned)
    n_train: int
    n_valid: int
    seconds: float = 0.0
    cv_fold: dict | None = None  # cv: the fold the trials are scored on ({fold, folds, assignment})

    @property
    def scored_on(self) -> str:
        """'the holdout', or e.g. 'fold 0 of 5'."""
        return f"fold {self.cv_fold['fold']} of {self.cv_fold['folds']}" if self.cv_fold else "the holdout"

    @property
    def best(self) -> TrialRow | None:
        done = [t for t in self.trials if t.state == "complete" and t.value is not None]
        if not done:
            return None
        sign = 1 if self.direction == "maximize" else -1
        return max(done, key=lambda t: (sign * t.value, -t.number))


# --------------------------------------------------------------------------------------------- members of trials
def _set_path(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    d[parts[-1]] = value


def trial_member(member: Member, tune: Tune, params: dict[str, Any]) -> Member:
    """The member a trial trains: the sampled values set, `tune.epochs` epochs at the member's final size (its
    progressive-resizing stages dropped), no `tune`. Raises InvalidTrial when the values make no valid member."""
    from pydantic import ValidationError

    d = member.model_dump(exclude={"tune"})
    d.update(epochs=tune.epochs, stages=None, size=member.final_size)
    for key, value in params.items():
        _set_path(d, key, value)
    try:
        return Member.model_validate(d)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise InvalidTrial(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None


def scored_data(data: CompetitionData, ens: Ensemble, fold: int | None, shown: str) -> CompetitionData:
    """The split trials are scored on: the holdout; in a cross-validated ensemble fold `fold` (default 0) of the
    competition's cv, the other folds training, as that fold's model in `ens run` (its fingerprint: another study)."""
    if ens.validation != "cv":
        if fold is not None:
            raise EnsError(f"--fold {fold}: {shown} validates on the holdout; --fold needs validation: cv")
        return data
    k = data.competition.cv.folds
    fold = 0 if fold is None else fold
    if not 0 <= fold < k:
        raise EnsError(f"--fold {fold}: the competition has folds 0 to {k - 1}; fix --fold")
    return fold_data(data, cv_folds(data), fold)


def trial_data(full: CompetitionData, member: Member, tune: Tune, cache_root: Path, seed: int) -> CompetitionData:
    """The images a trial reads: `tune.fraction` of the training images (stratified, seeded), every validation
    image; from the member's prepared copy where it has `prepare:` (the copy `ens run` uses too)."""
    if member.prepare:
        full = prepare_data(full, member.prepare, cache_root)
    return train_fraction(full, tune.fraction, seed)


def _study_name(ensemble_path: Path, member: Member, tune: Tune, data: CompetitionData, metric: str) -> str:
    """Everything that defines a trial but its sampled values: a change makes a new study (old trials would not
    compare); the number of trials and the pruner do not (more trials resume the study)."""
    fields = trial_member(member, tune, {}).key_fields()
    for key in tune.space:  # the tuned fields' own values in the YAML play no part
        node, parts = fields, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    space = {k: (v.model_dump() if isinstance(v, TuneRange) else v) for k, v in tune.space.items()}
    blob = json.dumps({"member": fields, "space": space, "epochs": tune.epochs, "fraction": tune.fraction,
                       "data": data.fingerprint, "metric": metric}, sort_keys=True, default=str)
    return f"{ensemble_path.stem}-{member.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------- sampling
def _encoded(choices: list) -> list:
    """Optuna's categorical choices must be scalars: lists and mappings (a size [h, w]) go in as JSON."""
    return [json.dumps(c) if isinstance(c, (list, dict)) else c for c in choices]


def _decode(tune: Tune, params: dict) -> dict:
    out = {}
    for key, value in params.items():
        spec = tune.space.get(key)
        if isinstance(spec, list) and isinstance(value, str) and value in _encoded(spec) and value not in spec:
            value = spec[_encoded(spec).index(value)]
        out[key] = value
    return out


def _suggest(trial, tune: Tune) -> dict:
    params = {}
    for key, spec in tune.space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, _encoded(spec))
        elif spec.is_int:
            params[key] = trial.suggest_int(key, spec.low, spec.high, step=spec.step or 1, log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return _decode(tune, params)


# --------------------------------------------------------------------------------------------- the callback
def _reporter(trial, metric: str, steps: int):
    """A fastai callback scoring the validation predictions with the competition's metric after every epoch,
    reporting the score to the trial, and raising optuna.TrialPruned when the pruner says so (never after the
    last epoch: a finished trial is complete)."""
    import torch
    from fastai.callback.core import Callback
    from optuna import TrialPruned

    from .ensemble import score

    class ReportToTrial(Callback):
        order = 70  # after the Recorder (50) and train.py's EpochLog (60)

        def __init__(self):
            self.step, self.values = 0, []

        def before_epoch(self):  # also before an epoch a resumed fit skips (no validation follows)
            self.preds, self.targets = [], []

        def after_batch(self):
            if not self.training:
                self.preds.append(self.pred.detach().float().cpu())
                self.targets.append(self.yb[0].detach().cpu())

        def after_epoch(self):
            if not self.preds:
                return
            probs = torch.softmax(torch.cat(self.preds), dim=1).numpy()
            value = score(metric, probs, torch.cat(self.targets).numpy())
            self.values.append(value)
            trial.report(value, self.step)
            self.step += 1
            if self.step < steps and trial.should_prune():
                raise TrialPruned(f"pruned after epoch {self.step} at {metric} {value:.4f}")

    return ReportToTrial()


# --------------------------------------------------------------------------------------------- the search
_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def _row(frozen, tune: Tune) -> TrialRow:
    values = frozen.intermediate_values
    value = frozen.value if frozen.value is not None else (values[max(values)] if values else None)
    return TrialRow(frozen.number, _STATES.get(frozen.state.name, frozen.state.name.lower()),
                    _decode(tune, frozen.params), value, len(values), frozen.user_attrs.get("seconds"),
                    frozen.user_attrs.get("error"))


def find_member(ens: Ensemble, name: str, where: str) -> Member:
    names = [m.name for m in ens.members]
    if name not in names:
        raise ConfigError(f"{where}: no member named '{name}'; members: {', '.join(names)}")
    member = ens.members[names.index(name)]
    if member.tune is None:
        raise ConfigError(f"{where}: member '{name}' has no tune: section; add one to the member or to defaults, "
                          "e.g. tune: {trials: 10, epochs: 2, fraction: 0.25, "
                          "space: {lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}")
    return member


def tune_member(project: Project, spec: str, member_name: str, overrides=(), n_trials: int | None = None,
                progress=None, *, pruner=None, on_trial: Callable[[TrialRow], None] | None = None,
                fold: int | None = None, parallel: "Parallel | None" = None) -> TuneResult:
    """Search the member's `tune.space`: run trials until `n_trials` (default `tune.trials`) have finished
    (complete or pruned) in the study, counting those of earlier calls. `pruner` replaces the one `tune.pruner`
    names (an optuna pruner); `on_trial` is called with each finished trial's row; `fold` is the fold a
    cross-validated ensemble's trials are scored on (default 0). With `parallel`, the trials run at once on Ray
    Tune (`_optimize_on_ray`), in the same study."""
    import optuna

    from .ensemble import GREATER_IS_BETTER
    from .models import check_arch
    from .run import check_ensemble
    from .train import train_member

    start = time.perf_counter()
    path, ens, comp = check_ensemble(project, spec, list(overrides))
    shown = project.relative(path)
    member = find_member(ens, member_name, shown)
    tune = member.tune
    if "arch" in tune.space and isinstance(tune.space["arch"], list):
        for arch in tune.space["arch"]:
            check_arch(str(arch), f"{shown}: {member_name}.tune.space.arch")
    target = n_trials if n_trials is not None else tune.trials
    if target < 1:
        raise ConfigError(f"--trials {target}: ask for at least one trial")

    full = scored_data(load_data(project, comp), ens, fold, shown)
    base = train_fraction(full, tune.fraction, member.seed)
    metric = comp.metric
    direction = "maximize" if GREATER_IS_BETTER[metric] else "minimize"
    storage_path = project.cache / comp.name / ".tune" / f"{path.stem}-{member.name}.db"
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    study_name = _study_name(path, member, tune, base, metric)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # ens reports the trials itself
    # a heartbeat lets a later call mark the trials of a killed process failed instead of running forever
    with warnings.catch_warnings():  # the heartbeat is "experimental" (since optuna 2.9)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{storage_path}", heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
    finished = ("COMPLETE", "PRUNED")
    done = sum(t.state.name in finished for t in study.trials)
    failed_before = sum(t.state.name == "FAIL" for t in study.trials)
    todo = max(0, target - done)
    # seeded by the member's seed, offset by the trials already made: a resumed search draws new values
    study.sampler = optuna.samplers.TPESampler(seed=member.seed + len(study.trials),
                                               n_startup_trials=min(10, max(2, target // 3)))
    if pruner is None:
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, target // 3))) if tune.pruner == "median"
                  else optuna.pruners.SuccessiveHalvingPruner() if tune.pruner == "asha" else optuna.pruners.NopPruner())
    study.pruner = pruner
    steps = scored_epochs(trial_member(member, tune, {}))  # of a trial with the YAML's values: ASHA's horizon

    def objective(trial) -> float:
        params = _suggest(trial, tune)
        try:
            m = trial_member(member, tune, params)
        except InvalidTrial as e:
            trial.set_user_attr("error", str(e))
            raise
        if progress is not None:
            progress.update(task, description=f"trial {trial.number}: "
                            + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        data = trial_data(full, m, tune, project.cache, member.seed)
        reporter = _reporter(trial, metric, scored_epochs(m))
        before = set(progress.task_ids) if progress is not None else set()
        t0 = time.perf_counter()
        try:
            train_member(m, data, progress, cbs=[reporter])
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            if progress is not None:  # a pruned trial's epoch bar is left behind by train_member
                for task_id in set(progress.task_ids) - before:
                    progress.remove_task(task_id)
        return reporter.values[-1]

    def finished_trial(study_, frozen) -> None:
        if progress is not None:
            progress.advance(task)
        if on_trial is not None:
            on_trial(_row(frozen, tune))

    task = progress.add_task(f"tuning {member.name}", total=todo) if progress is not None else None
    try:
        if todo and parallel is not None:
            _optimize_on_ray(parallel, project, study, storage, member, tune, full, metric, target, steps, progress,
                             task, on_trial, shown, failed_before, todo)
        elif todo:
            # a trial that fails (invalid values) does not count: run until `todo` trials have finished
            while sum(t.state.name in finished for t in study.trials) < target:
                study.optimize(objective, n_trials=1, catch=(InvalidTrial,), callbacks=[finished_trial])
                _check_failures(study, failed_before, todo, member, shown)
    finally:
        if progress is not None:
            progress.remove_task(task)
    rows = [_row(t, tune) for t in study.trials]
    ran = sum(1 for t in study.trials if t.state.name in finished) - done
    n_valid = sum(base.is_valid)
    return TuneResult(path, list(overrides), ens, comp, member, tune, metric, direction, storage_path, study_name,
                      rows, ran, target, len(base.is_valid) - n_valid, n_valid, time.perf_counter() - start,
                      base.cv_fold)


# --------------------------------------------------------------------------------------------- on Ray Tune
def _optimize_on_ray(parallel: "Parallel", project: Project, study, storage, member: Member, tune: Tune,
                     full: CompetitionData, metric: str, target: int, steps: int, progress, task, on_trial,
                     shown: str, failed_before: int, todo: int) -> None:
    """Trials at once on Ray Tune until `target` have finished in `study`: Optuna's sampler proposes the values
    through Tune's OptunaSearch, in ens's own study (its SQLite storage, so a search resumes, sequentially or in
    parallel alike); Tune's scheduler stops trailing trials in place of the pruner (median stopping, or ASHA);
    a trial whose worker dies is restarted by Tune and resumes from its last epoch checkpoint (kept under
    cache/<competition>/.tune/<study>/); each trial gets the task shape of `ens run --parallel`."""
    import shutil
    from datetime import datetime

    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from .schedule import Connection, _cause

    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops ens at once, as in a sequential search
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing (ens shows the trials)
    warnings.filterwarnings("ignore", "Heartbeat of storage")  # Tune asks and tells; the heartbeat still marks the
    # trials of a killed search failed
    mode = "max" if study.direction.name == "MAXIMIZE" else "min"
    checkpoints = storage_folder(project, full) / study.study_name
    finished = ("COMPLETE", "PRUNED")
    with Connection(parallel) as conn:
        shape = conn.slots()
        while (done := sum(t.state.name in finished for t in study.trials)) < target:
            searcher = _searcher(tune, mode, study, storage)
            scheduler = (MedianStoppingRule(time_attr="training_iteration", grace_period=1,
                                            min_samples_required=min(5, max(2, target // 3)))
                         if tune.pruner == "median" else
                         ASHAScheduler(time_attr="training_iteration", max_t=steps) if tune.pruner == "asha"
                         else FIFOScheduler())
            trainable = rt.with_resources(rt.with_parameters(
                _ray_trial, member=member, tune=tune, full=full, cache_root=str(project.cache), metric=metric,
                cpus=shape.cpus, checkpoints=str(checkpoints)), {"cpu": shape.cpus, "gpu": shape.gpus})
            name = f"{study.study_name}-{datetime.now():%Y%m%d-%H%M%S}"
            tuner = rt.Tuner(trainable, tune_config=rt.TuneConfig(
                metric="score", mode=mode, search_alg=searcher, scheduler=scheduler, num_samples=target - done,
                max_concurrent_trials=shape.concurrent),
                run_config=rt.RunConfig(name=name, storage_path=str(checkpoints.parent / "ray"), verbose=0,
                                        failure_config=rt.FailureConfig(max_failures=parallel.retries),
                                        callbacks=[_TrialCallback(searcher, tune, progress, task, on_trial)]))
            grid = tuner.fit()
            shutil.rmtree(checkpoints.parent / "ray" / name, ignore_errors=True)  # the study is the record
            errors = [r.error for r in grid if r.error is not None]
            if errors:
                raise _cause(errors[0])
            _check_failures(study, failed_before, todo, member, shown)


def scored_epochs(m: Member) -> int:
    """The epochs a trial of member `m` is scored after: its fine-tune's frozen ones too."""
    return m.epochs + (m.freeze_epochs if m.pretrained else 0)


def _check_failures(study, failed_before: int, todo: int, member: Member, shown: str) -> None:
    """Trials whose values make no valid member do not count; too many of them is the space's fault: one line."""
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    if len(failed) - failed_before > max(3, todo):
        raise EnsError(f"{len(failed) - failed_before} trials of {member.name} made no valid member, last: "
                       f"{failed[-1].user_attrs.get('error')}; fix {shown}'s tune.space")


def storage_folder(project: Project, data: CompetitionData) -> Path:
    return project.cache / data.competition.name / ".tune"


def _searcher(tune: Tune, mode: str, study, storage):
    """Tune's OptunaSearch on ens's study, telling Optuna what ens records: a trial stopped by the scheduler
    before its last epoch is pruned (not complete), values that make no valid member fail with the reason, and
    each trial's seconds (and whether it resumed after its worker died)."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class EnsOptunaSearch(OptunaSearch):
        def __getstate__(self):  # Tune pickles its experiment state: the study (SQLite) is the record instead
            return {}

        def save(self, checkpoint_path):  # Tune's experiment checkpoint: ens's study is the record (and resumes)
            pass

        def restore(self, checkpoint_path):
            pass

        def on_trial_result(self, trial_id, result):  # stepped by epoch, as a sequential search (a restarted
            # trial's training_iteration starts over; its epochs go on from the checkpoint)
            reported = self.__dict__.setdefault("_reported", set())
            if "score" in result and trial_id in self._ot_trials and trial_id not in self._completed_trials \
                    and (trial_id, result["epochs"]) not in reported:
                self._ot_trials[trial_id].report(result["score"], result["epochs"] - 1)
                reported.add((trial_id, result["epochs"]))

        def on_trial_complete(self, trial_id, result=None, error=False):
            ot_trial, result = self._ot_trials.get(trial_id), result or {}
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            self.on_trial_result(trial_id, result)  # the last result comes here alone when the trial ends on it
            if "time_total_s" in result:
                ot_trial.set_user_attr("seconds", round(result["time_total_s"], 2))
            if result.get("resumed"):
                ot_trial.set_user_attr("resumed", True)
            if result.get("invalid") or (result.get("epochs", 0) < result.get("steps", 0) and not error):
                if result.get("invalid"):
                    ot_trial.set_user_attr("error", result["invalid"])
                self._ot_study.tell(ot_trial, state=TrialState.FAIL if result.get("invalid") else TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return None
            return super().on_trial_complete(trial_id, result, error)

    # define-by-run: ens's own suggestions (lists and sizes encoded as Optuna needs them)
    return EnsOptunaSearch(space=lambda trial: (_suggest(trial, tune), None)[1], metric="score", mode=mode,
                           sampler=study.sampler, study_name=study.study_name, storage=storage)


class _TrialCallback:
    """Tune's callback in the driver: the progress bar and `on_trial` rows, as a sequential search shows them."""

    def __new__(cls, *args):
        from ray.tune import Callback

        class TrialCallback(Callback):
            def __init__(self, searcher, tune, progress, task, on_trial):
                self.searcher, self.tune = searcher, tune
                self.progress, self.task, self.on_trial = progress, task, on_trial

            def __getstate__(self):  # Tune pickles its experiment state; the display stays in this process
                return {}

            def on_trial_start(self, iteration, trials, trial, **info):
                if self.progress is not None:
                    running = sum(t.status == "RUNNING" for t in trials) or 1
                    self.progress.update(self.task, description=f"tuning: {running} trial(s) running")

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._finished(trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                self._finished(trial)

            def _finished(self, trial):
                ot = self.searcher._ot_trials.get(trial.trial_id)
                last = trial.last_result or {}
                if last.get("invalid") or ot is None:
                    return
                epochs = last.get("epochs", 0)
                state = "complete" if epochs >= last.get("steps", 0) else "pruned"
                if self.progress is not None:
                    self.progress.advance(self.task)
                if self.on_trial is not None:
                    self.on_trial(TrialRow(ot.number, state, _decode(self.tune, ot.params), last.get("score"), epochs,
                                           last.get("time_total_s")))

        return TrialCallback(*args)


def _ray_trial(config: dict, member: Member, tune: Tune, full: CompetitionData, cache_root: str, metric: str,
               cpus: int, checkpoints: str) -> None:
    """One trial inside a Tune worker: torch's threads set to its CPUs, the member trained with an epoch
    checkpoint under `checkpoints`/<trial id> (a restarted trial resumes there), the score reported after every
    epoch (`_reporter`)."""
    import shutil

    from ray import tune as rt

    from .schedule import prepare_worker
    from .train import load_checkpoint, train_member

    prepare_worker(cpus)
    try:
        m = trial_member(member, tune, _decode(tune, config))
    except InvalidTrial as e:
        rt.report({"invalid": str(e)})
        return
    folder = Path(checkpoints) / rt.get_context().get_trial_id()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pid").write_text(str(os.getpid()))  # whose trial this is (a test kills it)
    ckpt = load_checkpoint(folder)
    done = len(ckpt["history"]) if ckpt else 0  # epochs scored before a restart
    steps = scored_epochs(m)

    class ToTune:  # each result says how far the trial got of its own epochs (complete, or stopped: pruned)
        def report(self, value, step):
            rt.report({"score": value, "epochs": done + step + 1, "steps": steps, "resumed": bool(ckpt)})

        def should_prune(self):
            return False  # Tune's scheduler stops trials itself

    data = trial_data(full, m, tune, Path(cache_root), member.seed)
    train_member(m, data, None, checkpoint_dir=folder, cbs=[_reporter(ToTune(), metric, steps - done)])
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------- output
def write_best(result: TuneResult, dest: Path) -> Path:
    """The source ensemble (with the overrides) with the tuned member's fields set to the best trial's values."""
    best = result.best
    if best is None:
        raise EnsError(f"no trial of {result.member.name} has completed; nothing to write (run more trials)")
    raw = apply_overrides(read_yaml(result.ensemble_path), list(result.overrides))
    index = [m.name for m in result.ensemble.members].index(result.member.name)
    target = raw["members"][index]
    for key, value in best.params.items():
        _set_path(target, key, list(value) if isinstance(value, tuple) else value)
    t = result.tune
    header = (f"# written by `ens tune` from {result.ensemble_path.name}: member {result.member.name} has trial "
              f"{best.number}'s values, validation {result.metric} {best.value:.4f} on {result.scored_on} after "
              f"{t.epochs} epochs on {t.fraction:.0%} of the training images\n")
    return write_ensemble(dest, raw, header)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def render(result: TuneResult, console) -> None:
    """The trials as a rich table, the best marked, and a line naming the best values."""
    from rich.markup import escape
    from rich.table import Table

    t, best = result.tune, result.best
    table = Table(title=f"{result.ensemble_path.name}: tuning {result.member.name} ({result.member.arch}) on "
                        f"{result.competition.name}")
    keys = list(t.space)
    table.add_column("trial", justify="right")
    table.add_column("state")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column(f"valid {result.metric}", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("time", justify="right")
    for row in result.trials:
        is_best = best is not None and row.number == best.number
        state = row.state if row.state != "failed" or not row.error else f"failed: {row.error}"
        value = "" if row.value is None else f"{row.value:.4f}"
        if row.state == "pruned" and value:
            value = f"[dim]{value}[/]"
        table.add_row(f"{'★ ' if is_best else ''}{row.number}", escape(state),
                      *(_fmt(row.params[k]) if k in row.params else "" for k in keys), value, str(row.epochs),
                      "" if row.seconds is None else f"{row.seconds:.1f}s", style="bold green" if is_best else None)
    console.print(table)
    counts = {s: sum(r.state == s for r in result.trials) for s in ("complete", "pruned", "failed")}
    console.print(f"{len(result.trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
                  f"{counts['failed']} failed), {result.ran} run now; {t.epochs} epochs each on {result.n_train} "
                  f"training images ({t.fraction:.0%}), scored on {result.scored_on} ({result.n_valid} validation "
                  f"images); "
                  f"study {result.study_name} in {result.storage.name}", highlight=False)
    if best is None:
        console.print("[yellow]no trial has completed yet[/]")
    else:
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        console.print(f"[bold]best: trial {best.number}, valid {result.metric} {best.value:.4f}[/]: {escape(values)}")
