"""Verbs that train or would: `ens run`, `ens plan`, `ens validate`, `ens tune` (and the run-and-show `ens kaggle
push` shares)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import Project
from ..errors import EnsError
from ..util import spread
from .app import (
    AddressOpt,
    CpusOpt,
    GpusOpt,
    OverridesArg,
    ParallelOpt,
    ProjectOpt,
    _how,
    _parallel,
    _print_delivery,
    _progress,
    _project,
    _say,
    _with_progress,
    app,
    console,
    err,
)


@app.command(short_help="Train what is not cached, write and check the submission CSV, upload it to Kaggle.")
def run(ensemble: str = typer.Argument(..., help="ensembles/<competition>/<name>.yaml, or e.g. digits/final.yaml"),
        overrides: Optional[List[str]] = OverridesArg,
        submit: Optional[bool] = typer.Option(None, "--submit/--no-submit", help="upload to Kaggle, or not "
                                              "(default: upload what the YAML describes; a run with overrides "
                                              "uploads only with --submit)", show_default=False),
        no_wait: bool = typer.Option(False, "--no-wait", help="upload, but do not wait for the public score"),
        force: bool = typer.Option(False, "--force", help="upload even a CSV identical to one already submitted "
                                   "(or whose upload's outcome is unknown)"),
        track: bool = typer.Option(False, "--track", help="record the run in MLflow (as `tracking: mlflow` does): "
                                   "MLFLOW_TRACKING_URI, else mlflow.db in the project; needs ens[mlflow]"),
        folds: Optional[str] = typer.Option(None, "--folds", help="cross-validated ensembles: train only these folds "
                                            "(e.g. 0,1) for a quick look; no submission until every fold is done"),
        parallel: Optional[int] = ParallelOpt, address: Optional[str] = AddressOpt,
        gpus_per_member: float = GpusOpt, cpus_per_member: Optional[int] = CpusOpt,
        verbose: bool = typer.Option(False, "--verbose", "-v", help="also say where each trained member's start-up "
                                     "went: imports, data listing, loaders, model, memory probe, first step"),
        on: Optional[str] = typer.Option(None, "--on", help="where missing members train: kaggle (two T4s), "
                                         "kaggle:p100, kaggle:cpu; add ,offline for internet off (README: Train on "
                                         "Kaggle's GPUs)"),
        kaggle_hours: Optional[float] = typer.Option(None, "--kaggle-hours", help="--on kaggle: a notebook's time "
                                                     "limit in hours (default Kaggle's 12); it ends itself 15% before"),
        project: Optional[Path] = ProjectOpt):
    """Train an ensemble and write its submission: members not in the cache are trained, their predictions
    averaged, the CSV written and checked against the sample submission (and scored at once where the answers are
    known locally), then uploaded to Kaggle when the competition has a `kaggle:` slug, waiting for the public score.

    Example: ens run digits/final.yaml defaults.epochs=1 members.vit.lr=0.005
    """
    proj = _project(project)
    held = None
    if submit is None and overrides:  # a smoke test or an experiment: no daily submission spent unasked
        held = f"a run with overrides ({' '.join(overrides)}) submits only with --submit"
    remote = _remote(on, kaggle_hours, wait=not no_wait)
    if remote is not None and (parallel or address):
        raise EnsError("--on kaggle trains in Kaggle notebooks: leave out --parallel/--address")
    _run_and_show(proj, ensemble, overrides or [], submit=submit is not False and not held, held=held,
                  wait=not no_wait, force=force, verbose=verbose, track=track,
                  folds=_fold_list(folds), parallel=_parallel(parallel, address, gpus_per_member, cpus_per_member),
                  remote=remote)


def _remote(on: Optional[str], hours: Optional[float], wait: bool = True) -> Optional[dict]:
    """`--on kaggle[...]` → gather_members' `remote` options (None: train here)."""
    import os

    from ..remote.gpus import parse_on

    target = parse_on(on)
    if target is None:
        return None
    if hours is not None and not 0 < hours <= target.gpu.session_hours:
        raise EnsError(f"--kaggle-hours {hours:g}: give hours between 0 and Kaggle's {target.gpu.session_hours:g}")
    return {"target": target, "wait": wait, "say": _say, "hours": hours,
            "first_poll": float(os.environ.get("ENS_KAGGLE_POLL") or 10)}


def _run_and_show(proj: Project, ensemble: str, overrides: list[str], **options) -> None:
    """`run_ensemble` with progress (`options`: its keywords), then its table and where the submission went; a code
    competition's notebook steps are said on stderr."""
    from ..remote.runs import Pending
    from ..run import run_ensemble

    verbose = options.pop("verbose", False)
    options["notebook"] = {"say": _say, **options.get("notebook", {})}
    try:
        result = _with_progress(lambda progress, report: run_ensemble(proj, ensemble, overrides, progress, report,
                                                                      **options))
    except Pending as e:  # --on kaggle --no-wait: the notebooks run on; not an error
        console.print(f"kaggle: {e}", soft_wrap=True, highlight=False)
        return
    if result.csv is None:
        _print_incomplete(result, proj, ensemble, overrides)
        return
    _print_run(result, proj)
    if verbose:
        _print_startup(result)
    _print_delivery(result.delivery)


_PHASES = (("memory_probe_s", "memory probe"), ("loaders_s", "loaders"), ("model_s", "model"),
           ("first_step_s", "first step"))  # loaders: with `decode: true`, building or opening the decoded copy too


def _print_startup(result) -> None:
    """Where the time before each trained member's first training step went (a member trained in a Ray task
    started in its own process: its imports and data listing are the task's, not shown)."""
    run = (result.gathered.startup if result.gathered else {}) or {}
    before = run.get("imports_s", 0.0) + run.get("data_s", 0.0)
    if run:
        console.print(f"start-up: imports {run['imports_s']:.1f}s, data listing and fingerprint {run['data_s']:.1f}s")
    first = True
    for o in result.members:
        phases = o.entry.meta.get("startup_timings") if o.trained else None
        if not phases:
            continue
        parts = ", ".join(f"{label} {phases[k]:.1f}s" for k, label in _PHASES if k in phases)
        total = f"; its first step {before + sum(phases.values()):.1f}s after ens started" if first and run else ""
        console.print(f"  {o.member.name}: {parts}{total}")
        first = False


def _fold_list(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        folds = sorted({int(f) for f in text.split(",") if f.strip()})
    except ValueError:
        raise EnsError(f"--folds {text}: give fold numbers separated by commas, e.g. --folds 0,1") from None
    if not folds:
        raise EnsError("--folds: name at least one fold, e.g. --folds 0")
    return folds


def _print_incomplete(result, proj: Project, spec: str, overrides: list[str]) -> None:
    """A quick look at some folds: what each fold model scored, and what is missing for the blend."""
    from ..crossval import unit_name

    g = result.gathered
    table = Table(title=f"{proj.relative(result.ensemble_path)}: fold models so far")
    for col in ("member", "fold", "valid acc", "TTA acc", "train+TTA", "source"):
        table.add_column(col, justify="left" if col in ("member", "source") else "right")
    for o in g.units:
        metrics = o.entry.meta.get("metrics") or {}
        table.add_row(o.member.name, unit_name(o.fold).removeprefix("fold "),
                      f"{metrics['plain_accuracy']:.4f}" if metrics else "", f"{metrics['tta_accuracy']:.4f}" if metrics else "",
                      f"{sum(o.entry.meta['timings'].values()):.1f}s", _how(o))
    console.print(table)
    said = {tuple(folds) for folds in g.incomplete.values()}
    names = lambda folds: ", ".join(unit_name(f) for f in folds)  # noqa: E731
    lacking = (f"every member lacks {names(next(iter(said)))}" if len(said) == 1 and len(g.incomplete) == len(g.outcomes) + len(g.incomplete)
               else "; ".join(f"{name} lacks {names(folds)}" for name, folds in g.incomplete.items()))
    console.print(f"out-of-fold probabilities incomplete, so no blend and no submission yet ({lacking}); "
                  f"run `ens run {' '.join([spec, *overrides])}` without --folds to train the rest", soft_wrap=True)




def _sources(outcomes) -> list[tuple[str, int]]:
    """How many members were trained (resumed), cached, predicted, derived: 'trained' and 'cached' always."""
    from collections import Counter

    counts = Counter(o.how for o in outcomes)
    return [(how, counts[how]) for how in ("trained", "resumed", "kaggle", "predicted", "derived", "cached")
            if counts[how] or how in ("trained", "cached")]




def batch_text(meta: dict) -> str:
    """A cached member's batch as trained: '64', or on CUDA '64 ≈ 16 × 4' (micro-batch × accumulation steps)."""
    mem = meta.get("memory")
    if not mem:
        return str((meta.get("member") or {}).get("batch_size", ""))
    if mem["accumulation_steps"] == 1:
        return str(mem["micro_batch"])
    sign = "≈" if mem.get("approximate", True) else "="
    return f"{mem['effective_batch']} {sign} {mem['micro_batch']} × {mem['accumulation_steps']}"


def _print_run(result, proj: Project) -> None:
    g, blended, cv = result.gathered, result.blended, result.gathered.cv
    table = Table(title=f"{proj.relative(result.ensemble_path)} on {result.competition.name}"
                        + (f" ({g.competition.cv.folds}-fold cross-validation)" if cv else ""))
    scored = result.test_score is not None
    rows = "OOF" if cv else "valid"
    micro = any(o.entry.meta.get("memory") for o in result.members)  # trained on CUDA: micro-batch × steps
    columns = (["member", "arch", "size", "epochs", *(["batch"] if micro else []), f"{rows} acc", "TTA acc"]
               + (["folds (TTA)"] if cv else [])
               + (["test acc" if result.metric == "accuracy" else f"test {result.metric}"] if scored else []))
    for col in columns + ["train+TTA", "source"]:  # the member lines' two times, summed
        table.add_column(col, justify="left" if col in ("member", "arch", "source") else "right")
    for o in result.members:
        m, meta = o.member, o.entry.meta
        seconds = sum(meta["timings"].values())
        test = [f"{o.test_score:.4f}"] if scored else []
        table.add_row(m.name, m.arch, str(m.final_size), str(m.total_epochs), *([batch_text(meta)] if micro else []),
                      f"{meta['metrics']['plain_accuracy']:.4f}",
                      f"{meta['metrics']['tta_accuracy']:.4f}", *([spread(o.fold_scores("tta_accuracy"))] if cv else []), *test,
                      f"{seconds:.1f}s", _how(o))
    if scored:
        method = result.ensemble.combine.method
        name = (f"{'weighted ' if len({o.member.weight for o in result.members}) > 1 else ''}mean"
                if method == "mean" else method)
        table.add_section()
        table.add_row("ensemble", name, "", "", *([""] if micro else []), "",
                      f"{result.valid_score:.4f}" if result.metric == "accuracy" else "",
                      *([""] if cv else []), f"{result.test_score:.4f}", f"{result.seconds:.1f}s", "")
    console.print(table)
    if any("≈" in batch_text(o.entry.meta) for o in result.members):
        console.print("≈: gradient accumulation, micro-batch × steps; approximately the full batch's step (BatchNorm "
                      "normalises each micro-batch on its own)")
    where = "out-of-fold" if cv else "valid"
    honest = ""
    if blended.learned:
        over = f"the {g.competition.cv.folds} folds" if cv else "5 parts of the holdout"
        honest = (f" — nested cross-validation estimate over {over} (honest); the blend scores "
                  f"{blended.in_sample:.4f} on the rows that chose its weights (optimistic)")
    console.print(f"ensemble {where} {result.metric}: [bold]{result.valid_score:.4f}[/]{honest} "
                  f"({', '.join(f'{n} {how}' for how, n in _sources(result.members))}, "
                  f"{result.seconds:.1f}s)")
    if cv:
        test_from = "a refit on every training image" if result.ensemble.refit == "full" else "the mean of the fold models"
        console.print(f"test predictions: {test_from}")
    if result.unchanged:  # a rerun of the same resolved ensemble on the same members: no copy written
        console.print(f"{result.unchanged} ({result.rows} rows, checked against the sample)", soft_wrap=True)
    else:
        console.print(f"submission: {proj.shown(result.csv)} ({result.rows} rows, checked against the sample)")
    if result.test_score is not None:
        console.print(f"test {result.metric} on the local answers: [bold]{result.test_score:.4f}[/]")


@app.command(short_help="A dry run: per member, cached or to train, batch, parameters, FLOPs (saved by stages), time.")
def plan(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
         overrides: Optional[List[str]] = OverridesArg,
         on: Optional[str] = typer.Option(None, "--on", help="kaggle[:t4x2|p100|cpu]: also what `ens run --on "
                                          "kaggle` would send, in how many notebooks"),
         kaggle_hours: Optional[float] = typer.Option(None, "--kaggle-hours", help="--on kaggle: a notebook's limit"),
         project: Optional[Path] = ProjectOpt):
    """A dry run, nothing trained: per member, cached or not, stages, batch (micro-batch × accumulation on
    CUDA), parameters, FLOPs per image at each stage size, the FLOPs its stages save, and an estimated time where
    one was measured before; the disk of the decoded copies (decode: true). Before the data is downloaded, what
    the YAMLs tell (the competition's `expected:` counts) and a line on what is not known; nothing is downloaded.

    Example: ens plan paddy/final.yaml
    """
    from ..plan import plan_ensemble, render

    proj = _project(project)
    remote = _remote(on, kaggle_hours)
    render(plan_ensemble(proj, ensemble, overrides or []), console)
    if remote is not None:
        from ..plan.kaggle import kaggle_plan

        for line in kaggle_plan(proj, ensemble, overrides or [], remote["target"], kaggle_hours):
            console.print(line, highlight=False, soft_wrap=True)


@app.command(short_help="Search one member's hyperparameters with Optuna; --write the best values into an ensemble.")
def tune(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
         member: str = typer.Argument(..., help="the member to tune (its `tune:` declares the search)"),
         overrides: Optional[List[str]] = OverridesArg,
         trials: Optional[int] = typer.Option(None, "--trials", help="finished trials wanted in all (default tune.trials); "
                                              "trials already in the study count"),
         write: Optional[Path] = typer.Option(None, "--write", help="write the ensemble with the best values as YAML"),
         fold: Optional[int] = typer.Option(None, "--fold", help="cv ensembles: the fold the trials are scored on "
                                            "(default 0)"),
         parallel: Optional[int] = ParallelOpt, address: Optional[str] = AddressOpt,
         gpus_per_member: float = GpusOpt, cpus_per_member: Optional[int] = CpusOpt,
         project: Optional[Path] = ProjectOpt):
    """Hyperparameter search for one member with Optuna (TPE, median pruning): `tune.trials` trials of `tune.epochs`
    epochs on `tune.fraction` of the training images, scored on the validation images (in a cross-validated
    ensemble: on one fold's). Resumes an interrupted search. With --parallel N (or --address), N trials at once
    on Ray Tune, in the same study.

    Example: ens tune digits/final.yaml resnet --trials 20 --write ensembles/digits/tuned.yaml
    """
    from ..tune import render, tune_member, write_best

    proj = _project(project)

    def report(row):
        value = "" if row.value is None else f" {row.value:.4f}"
        console.print(f"[green]✓[/] trial {row.number} {row.state}{value} ({row.epochs} epochs)")

    with _progress() as progress:
        result = tune_member(proj, ensemble, member, overrides or [], trials, progress, on_trial=report, fold=fold,
                             parallel=_parallel(parallel, address, gpus_per_member, cpus_per_member))
    render(result, console)
    if write:
        console.print(f"wrote {proj.shown(write_best(result, write))}")


@app.command(short_help="Check an ensemble YAML and its competition without training anything.")
def validate(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
             overrides: Optional[List[str]] = OverridesArg, project: Optional[Path] = ProjectOpt):
    """Check an ensemble (and its competition) without training: keys, types, architectures, member names."""
    from ..run import check_ensemble, config_warnings, weights_notes

    proj = _project(project)
    path, ens, comp = check_ensemble(proj, ensemble, overrides or [])
    for line in config_warnings(ens, overrides or []):
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    for line in weights_notes(ens):
        err.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)
    how = (f", {comp.cv.folds}-fold cross-validation" + (" + refit" if ens.refit == "full" else "")
           if ens.validation == "cv" else "")
    members = f"{len(ens.members)} member{'s' * (len(ens.members) != 1)}"
    console.print(f"{proj.relative(path)}: ok — {members} on {comp.name}{how} "
                  f"({', '.join(m.name for m in ens.members)})")
