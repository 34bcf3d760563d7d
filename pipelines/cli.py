"""The `ens` command: parse, call, print. Errors users can cause arrive as EnsError and leave as one line.

Nothing heavy is imported at module level: `ens --help`, `ens validate` and `ens cache ls` answer at once.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import PROJECT_ENV, Project
from .errors import EnsError
from .util import spread

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ensembles of image classifiers for image-classification competitions (Kaggle's, or your own "
                       "labelled folders; one label per image, or one class's probability), described in YAML: each "
                       "member trained once and cached, their test-time-augmented predictions averaged into a "
                       "submission CSV checked against the competition's sample submission, and uploaded to Kaggle "
                       "when the competition names one.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect the member cache.")
app.add_typer(cache_app, name="cache")
kaggle_app = typer.Typer(no_args_is_help=True, help="Code competitions: the ensemble as a Kaggle notebook that "
                         "predicts offline (pushed, followed, submitted).")
app.add_typer(kaggle_app, name="kaggle")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs: room for the tables
err = Console(stderr=True)

ProjectOpt = typer.Option(None, "--project", "-p", envvar=PROJECT_ENV,
                          help="The project folder (holding competitions/); default: found upwards from here.")
OverridesArg = typer.Argument(None, metavar="[KEY=VALUE]...",
                              help="Overrides: defaults.epochs=1, members.NAME.lr=0.01, ...")


def _project(root: Optional[Path]) -> Project:
    return Project.find(root)


ParallelOpt = typer.Option(None, "--parallel", "-j", metavar="N",
                           help="train up to N missing members (fold models, trials) at once as Ray tasks on a local "
                                "Ray cluster (one GPU each where there are GPUs); needs ens[ray]")
AddressOpt = typer.Option(None, "--address", envvar="RAY_ADDRESS", metavar="HOST:PORT|auto",
                          help="join a running Ray cluster instead (every node must see this project folder)")
GpusOpt = typer.Option(1.0, "--gpus-per-member", help="with --parallel/--address on GPUs: each task's share of a "
                       "GPU (0.5: two members per card)")
CpusOpt = typer.Option(None, "--cpus-per-member", help="with --parallel/--address: each task's CPUs and torch "
                       "threads (default: a node's CPUs shared among its tasks)")


def _parallel(n: Optional[int], address: Optional[str], gpus: float, cpus: Optional[int]):
    """The Ray options of --parallel/--address, or None (then Ray is not imported)."""
    if n is None and not address:
        return None
    from .schedule import Parallel

    return Parallel(n=n, address=address, gpus_per_member=gpus, cpus_per_member=cpus)


@app.command(short_help="Train what is not cached, write and check the submission CSV, upload it to Kaggle.")
def run(ensemble: str = typer.Argument(..., help="ensembles/<competition>/<name>.yaml, or e.g. digits/final.yaml"),
        overrides: Optional[List[str]] = OverridesArg,
        no_submit: bool = typer.Option(False, "--no-submit", help="do not upload to Kaggle"),
        no_wait: bool = typer.Option(False, "--no-wait", help="upload, but do not wait for the public score"),
        force: bool = typer.Option(False, "--force", help="upload even a CSV identical to one already submitted "
                                   "(or whose upload's outcome is unknown)"),
        folds: Optional[str] = typer.Option(None, "--folds", help="cross-validated ensembles: train only these folds "
                                            "(e.g. 0,1) for a quick look; no submission until every fold is done"),
        parallel: Optional[int] = ParallelOpt, address: Optional[str] = AddressOpt,
        gpus_per_member: float = GpusOpt, cpus_per_member: Optional[int] = CpusOpt,
        project: Optional[Path] = ProjectOpt):
    """Train an ensemble and write its submission: members not in the cache are trained, their predictions
    averaged, the CSV written and checked against the sample submission (and scored at once where the answers are
    known locally), then uploaded to Kaggle when the competition has a `kaggle:` slug, waiting for the public score.

    Example: ens run digits/final.yaml defaults.epochs=1 members.vit.lr=0.005
    """
    proj = _project(project)
    _run_and_show(proj, ensemble, overrides or [], submit=not no_submit, wait=not no_wait, force=force,
                  folds=_fold_list(folds), parallel=_parallel(parallel, address, gpus_per_member, cpus_per_member))


def _run_and_show(proj: Project, ensemble: str, overrides: list[str], **options) -> None:
    """`run_ensemble` with progress (`options`: its keywords), then its table and where the submission went; a code
    competition's notebook steps are said on stderr."""
    from .run import run_ensemble

    options["notebook"] = {"say": _say, **options.get("notebook", {})}
    result = _with_progress(lambda progress, report: run_ensemble(proj, ensemble, overrides, progress, report,
                                                                  **options))
    if result.csv is None:
        _print_incomplete(result, proj, ensemble, overrides)
        return
    _print_run(result, proj)
    _print_delivery(result.delivery)


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
    from .crossval import unit_name

    g = result.gathered
    table = Table(title=f"{proj.relative(result.ensemble_path)}: fold models so far")
    for col in ("member", "fold", "valid acc", "TTA acc", "time", "source"):
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


def _print_delivery(delivery) -> None:
    """The Kaggle outcome: a note, or the one-line error and a non-zero exit (the CSV and its history stay)."""
    if delivery.note:
        console.print(f"kaggle: {escape(delivery.note)}", highlight=False, soft_wrap=True)
    if delivery.error:
        raise EnsError(delivery.error)


def _progress():
    """The progress display of long verbs: members, epochs, batches, trials (transient: gone when done). Redrawn
    ten times a second on a terminal; into a file or a pipe (logs, `nohup`, a benchmark) nothing is drawn, so no
    redrawing thread is started there: it would only build tables nobody sees, and wake beside the training."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True,
                    auto_refresh=console.is_terminal or console.is_jupyter)


def _with_progress(work):
    """Run `work(progress, report)` under a rich progress display; `report` prints one line per member."""

    def report(outcome):
        from .crossval import unit_name

        m, metrics = outcome.member, outcome.entry.meta.get("metrics") or {}
        how = _how(outcome)
        if outcome.trained:
            how += f" in {outcome.entry.meta['timings']['train_seconds']:.1f}s"
        what = f"{m.name} ({m.arch})" + ("" if outcome.fold is None else f" {unit_name(outcome.fold)}")
        scores = (f"valid accuracy {metrics['plain_accuracy']:.4f}, TTA {metrics['tta_accuracy']:.4f}" if metrics
                  else "no validation images (trained on every training image)")
        console.print(f"[green]✓[/] {what} {how}: {scores}")

    with _progress() as progress:
        result = work(progress, report)
    for key, reason in getattr(result, "damaged", ()):  # cache entries found damaged on the way
        err.print(f"[yellow]warning:[/] cache entry {key} was damaged ({reason}); moved to .damaged/ and recomputed")
    for line in getattr(result, "warnings", None) or getattr(getattr(result, "gathered", None), "warnings", ()):
        err.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)
    return result


def _sources(outcomes) -> list[tuple[str, int]]:
    """How many members were trained (resumed), cached, predicted, derived: 'trained' and 'cached' always."""
    from collections import Counter

    counts = Counter(o.how for o in outcomes)
    return [(how, counts[how]) for how in ("trained", "resumed", "predicted", "derived", "cached")
            if counts[how] or how in ("trained", "cached")]


def _how(outcome) -> str:
    """Where a member's probabilities came from, for the results: cached, trained, resumed (where), predicted
    (from kept weights: a new TTA), derived (another TTA beta from cached arrays)."""
    how = outcome.how
    if how == "resumed":
        how += f" ({outcome.entry.meta.get('resumed_at')})"
    return how


def _print_run(result, proj: Project) -> None:
    g, blended, cv = result.gathered, result.blended, result.gathered.cv
    table = Table(title=f"{proj.relative(result.ensemble_path)} on {result.competition.name}"
                        + (f" ({g.competition.cv.folds}-fold cross-validation)" if cv else ""))
    scored = result.test_score is not None
    rows = "OOF" if cv else "valid"
    columns = (["member", "arch", "size", "epochs", f"{rows} acc", "TTA acc"] + (["folds (TTA)"] if cv else [])
               + (["test acc" if result.metric == "accuracy" else f"test {result.metric}"] if scored else []))
    for col in columns + ["time", "source"]:
        table.add_column(col, justify="left" if col in ("member", "arch", "source") else "right")
    for o in result.members:
        m, meta = o.member, o.entry.meta
        seconds = sum(meta["timings"].values())
        test = [f"{o.test_score:.4f}"] if scored else []
        table.add_row(m.name, m.arch, str(m.final_size), str(m.total_epochs), f"{meta['metrics']['plain_accuracy']:.4f}",
                      f"{meta['metrics']['tta_accuracy']:.4f}", *([spread(o.fold_scores("tta_accuracy"))] if cv else []), *test,
                      f"{seconds:.1f}s", _how(o))
    if scored:
        method = result.ensemble.combine.method
        name = (f"{'weighted ' if len({o.member.weight for o in result.members}) > 1 else ''}mean"
                if method == "mean" else method)
        table.add_section()
        table.add_row("ensemble", name, "", "", "", f"{result.valid_score:.4f}" if result.metric == "accuracy" else "",
                      *([""] if cv else []), f"{result.test_score:.4f}", f"{result.seconds:.1f}s", "")
    console.print(table)
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
    console.print(f"submission: {proj.relative(result.csv)} ({result.rows} rows, checked against the sample)")
    if result.test_score is not None:
        console.print(f"test {result.metric} on the local answers: [bold]{result.test_score:.4f}[/]")


@app.command(short_help="What each member adds, from cached validation predictions (no training); pick a subset.")
def ablate(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
           overrides: Optional[List[str]] = OverridesArg,
           cached_only: bool = typer.Option(False, "--cached-only", help="use the cached members only; train nothing"),
           top: int = typer.Option(10, "--top", help="how many of the best subsets to show"),
           probs: Optional[str] = typer.Option(None, "--probs", help="tta or plain (default: the ensemble's)"),
           rounds: int = typer.Option(25, "--rounds", help="greedy selection rounds"),
           pick: str = typer.Option("greedy", "--pick", help="what --write/--submit use: greedy (its weights), subset "
                                    "(the best), or a combine method (mean, hill_climb, rank, power, stack) over every member"),
           write: Optional[Path] = typer.Option(None, "--write", help="write the chosen members and weights as an ensemble YAML"),
           submit: bool = typer.Option(False, "--submit", help="write, check, record (and upload, as `ens run` does) the chosen blend's submission"),
           force: bool = typer.Option(False, "--force", help="with --submit: upload even a CSV already submitted"),
           project: Optional[Path] = ProjectOpt):
    """What does each member add? Scores from the cached validation probabilities: each member alone, the ensemble
    without each, every subset, greedy selection with weights, and how alike the members' errors are.

    Example: ens ablate digits/final.yaml --top 5 --write ensembles/digits/selected.yaml
    """
    from .ablate import ablate as run_ablation
    from .ablate import write_selection
    from .run import blend_and_submit

    if probs not in (None, "tta", "plain"):
        raise EnsError(f"--probs {probs}: choose tta or plain")
    from .config import COMBINE_METHODS

    if pick not in ("greedy", "subset", *COMBINE_METHODS):
        raise EnsError(f"--pick {pick}: choose greedy, subset, or a combine method ({', '.join(COMBINE_METHODS)})")
    proj = _project(project)
    result = _with_progress(lambda progress, report: run_ablation(
        proj, ensemble, overrides or [], cached_only, probs, rounds, progress, report))
    _print_ablation(result, top)
    if write:
        dest = write_selection(result, overrides or [], write, pick)
        console.print(f"wrote {proj.relative(dest)}")
    if submit:
        chosen, weights = result.pick(pick)
        blend = blend_and_submit(proj, result.gathered, chosen, weights, f"{result.gathered.path.stem}-{pick}",
                                 result.probs, force=force, combine=result.combine(pick))
        console.print(f"submission: {proj.relative(blend.csv)} ({blend.rows} rows, checked against the sample); "
                      f"valid {result.metric} {blend.valid_score:.4f}"
                      + (f", test {blend.test_score:.4f}" if blend.test_score is not None else ""))
        _print_delivery(blend.delivery)


def _delta(value: float, reference: float) -> str:
    d = value - reference
    return f"{d:+.4f}" if abs(d) >= 5e-5 else "0"


def _interval(ci) -> str:
    return "" if ci is None else f"[{ci[1]:+.4f}, {ci[2]:+.4f}]"


def _print_fold_scores(r) -> None:
    k = max(len(row.folds or ()) for row in r.members)
    console.print(f"\n[bold]per fold[/] (each fold model on the images it did not see; {r.probs} {r.metric})")
    t = Table()
    t.add_column("member")
    for f in range(k):
        t.add_column(f"fold {f}", justify="right")
    t.add_column("mean ± std", justify="right")
    for row in r.members:
        if row.folds:
            t.add_row(row.name, *[f"{v:.4f}" for v in row.folds], spread(row.folds))
    console.print(t)


def _print_methods(r) -> None:
    from .ensemble import GREATER_IS_BETTER

    over = f"the {r.n_folds} folds" if r.gathered.cv else f"{r.n_folds} parts of the holdout"
    console.print(f"\n[bold]combine methods[/] (`combine:` in the ensemble; this one's is "
                  f"{r.gathered.ensemble.combine.method}). A learned blend's weights are chosen on the rows it is "
                  f"scored on, so its in-sample score flatters it: the honest score is nested cross-validation over "
                  f"{over} (weights learned on the others, scored on the held one).", soft_wrap=True)
    t = Table()
    for col in ("method", "weights", "in-sample", "honest", "per part", "log loss"):
        t.add_column(col, justify="left" if col in ("method", "weights") else "right")
    best = max(r.methods, key=lambda m: m.honest if GREATER_IS_BETTER[r.metric] else -m.honest)
    for m in r.methods:
        name = f"[bold]{m.method}[/]" if m is best else m.method
        t.add_row(name, "learned" if m.learned else "fixed", f"{m.in_sample:.4f}",
                  f"{m.honest:.4f}" + (" (nested)" if m.learned else ""),
                  spread(m.per_fold), f"{m.log_loss:.4f}")
    console.print(t)


def _moves(c) -> str:
    return "" if c is None else f"{c[0]} (+{c[1]} −{c[2]})"


def _print_views(r) -> None:
    console.print("\n[bold]TTA views[/] (each member's own, from its cached arrays): a view alone, and the member's TTA "
                  "without it; a positive Δ without a view says it does not help")
    t = Table()
    for col in ("member", "view", "alone", "TTA without it", "Δ", "member's TTA"):
        t.add_column(col, justify="left" if col in ("member", "view") else "right")
    for row in r.views:
        t.add_row(row.member, row.view, f"{row.alone:.4f}", "" if row.without is None else f"{row.without:.4f}",
                  "" if row.without is None else _delta(row.without, row.tta), f"{row.tta:.4f}")
    console.print(t)


def _print_ablation(r, top: int) -> None:
    g = r.gathered
    rows = (f"{r.n_valid} out-of-fold rows (every training image, {r.n_folds} folds)" if g.cv
            else f"{r.n_valid} holdout validation images")
    console.print(f"[bold]{g.path.name}[/] on {g.competition.name}: {r.metric} on {rows} ({r.probs} probabilities); "
                  f"one image is {1 / r.n_valid:.4f}. 'changed' counts the images whose predicted label differs from "
                  "the full ensemble's (+ now right, − now wrong); '95% CI' is a paired bootstrap interval of Δ over "
                  "the images and 'p' McNemar's exact test of the hits: an interval holding 0, or a large p, is not "
                  "a difference shown.", soft_wrap=True)
    from .crossval import unit_name

    uncached = [m.name for m in g.missing if m.name not in g.incomplete]
    if uncached:
        console.print(f"[yellow]not cached, left out:[/] {', '.join(uncached)}")
    if g.incomplete:
        console.print("[yellow]fold models not cached, left out:[/] " + "; ".join(
            f"{name} ({', '.join(unit_name(f) for f in folds)})" for name, folds in g.incomplete.items()))
    console.print(f"\n[bold]full ensemble: {r.full:.4f}[/] (log loss {r.full_log_loss:.4f}, weighted mean); each "
                  "member alone, and the ensemble without it")
    t = Table()
    for col in ("member", "weight", "alone", "Δ", "95% CI", "p", "changed", "without it", "Δ ", "95% CI ", "p ", "changed "):
        t.add_column(col, justify="left" if col == "member" else "right")
    for o, row in zip(r.outcomes, r.members):
        t.add_row(row.name, f"{o.member.weight:g}", f"{row.alone:.4f}", _delta(row.alone, r.full),
                  _interval(row.alone_interval), f"{row.alone_p:.2g}", _moves(row.alone_changed),
                  "" if row.without is None else f"{row.without:.4f}",
                  "" if row.without is None else _delta(row.without, r.full), _interval(row.without_interval),
                  "" if row.without_p is None else f"{row.without_p:.2g}", _moves(row.without_changed))
    console.print(t)
    if any(row.folds for row in r.members):
        _print_fold_scores(r)
    if r.views:
        _print_views(r)
    _print_methods(r)
    if r.subsets:
        console.print(f"\n[bold]best subsets[/] (of {len(r.subsets)}, members keeping their weights)")
        t = Table()
        for col in ("rank", "members", r.metric, "log loss"):
            t.add_column(col, justify="left" if col == "members" else "right")
        for rank, (idx, s, ll) in enumerate(r.subsets[:top], start=1):
            t.add_row(str(rank), " + ".join(r.names[i] for i in idx), f"{s:.4f}", f"{ll:.4f}")
        console.print(t)
    console.print(f"\n[bold]greedy selection with replacement[/] ({r.greedy_rounds} rounds, Caruana et al. 2004): "
                  f"{r.greedy_score:.4f} (log loss {r.greedy_log_loss:.4f})")
    t = Table()
    t.add_column("member")
    t.add_column("picks", justify="right")
    t.add_column("weight", justify="right")
    total = max(int(r.greedy_counts.sum()), 1)
    for name, count in zip(r.names, r.greedy_counts):
        t.add_row(name, str(int(count)), f"{count / total:.3f}")
    console.print(t)
    console.print("\n[bold]error correlation[/] (of 1 − p(true class)): near 1, two members fail on the same images")
    t = Table()
    t.add_column("")
    for name in r.names:
        t.add_column(name, justify="right")
    for name, row in zip(r.names, r.correlation):
        t.add_row(name, *[f"{v:.2f}" for v in row])
    console.print(t)


@app.command(short_help="A dry run: per member, cached or to train, batch, parameters, FLOPs (saved by stages), time.")
def plan(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
         overrides: Optional[List[str]] = OverridesArg, project: Optional[Path] = ProjectOpt):
    """A dry run, nothing trained: per member, cached or not, stages, batch (micro-batch × accumulation on
    CUDA), parameters, FLOPs per image at each stage size, the FLOPs its stages save, and an estimated time where
    one was measured before; the disk of the decoded copies (decode: true). Before the data is downloaded, what
    the YAMLs tell (the competition's `expected:` counts) and a line on what is not known; nothing is downloaded.

    Example: ens plan paddy/final.yaml
    """
    from .plan import plan_ensemble, render

    render(plan_ensemble(_project(project), ensemble, overrides or []), console)


@app.command("bench", short_help="Each kept member's speed and size: ms per image (batch 1 and batched), parameters.")
def bench_command(ensemble: str = typer.Argument(..., help="the ensemble YAML (members with keep_model: true)"),
                  overrides: Optional[List[str]] = OverridesArg,
                  batch: int = typer.Option(32, "--batch", help="the batched inference's batch size"),
                  project: Optional[Path] = ProjectOpt):
    """How fast and how big each member is, for choosing members when inference time or size counts: validation
    accuracy and loss, inference time per image on this machine (one image at a time, and batched), parameters,
    in-memory and on-disk size. Needs members trained with keep_model: true. A table, and a CSV beside the
    submissions.

    Example: ens bench digits/final.yaml defaults.keep_model=true
    """
    from .evaluate import bench, write_bench_csv

    proj = _project(project)
    rows, device = bench(proj, ensemble, overrides or [], batch)
    table = Table(title=f"{ensemble} on {device}")
    for col in ("member", "arch", "size", "models", "valid acc", "valid loss", "ms/img (1)", f"ms/img ({batch})",
                "params", "memory MB", "disk MB"):
        table.add_column(col, justify="left" if col in ("member", "arch") else "right")
    for r in rows:  # a cross-validated member predicts with each of its fold models: its costs are theirs summed
        table.add_row(r.name, r.arch, str(r.size), str(r.models), f"{r.valid_accuracy:.4f}", f"{r.valid_loss:.4f}",
                      f"{r.ms_per_image_batch1:.3f}", f"{r.ms_per_image_batched:.3f}", f"{r.params:,}",
                      f"{r.memory_mb:.2f}", f"{r.disk_mb:.2f}")
    console.print(table)
    _print_teachers(proj, ensemble, overrides or [], rows, batch)
    competition = _competition_of(proj, ensemble, overrides)
    dest = write_bench_csv(rows, proj.submissions / competition / f"bench-{Path(ensemble).stem}.csv")
    console.print(f"wrote {proj.relative(dest)}")


def _competition_of(proj: Project, ensemble: str, overrides) -> str:
    from .config import load_ensemble

    return load_ensemble(proj, ensemble, overrides or [])[2].name


def _print_teachers(proj: Project, ensemble: str, overrides: list[str], rows, batch: int) -> None:
    """A distilled (or pseudo-labelled) member beside its teacher ensemble: what the student saves at inference."""
    from .evaluate import bench, teachers

    mine = {r.name: r for r in rows}
    for name, spec in teachers(proj, ensemble, overrides).items():
        if name not in mine:
            continue
        teacher = bench(proj, spec, batch=batch)[0]
        student, cost = mine[name], sum(r.ms_per_image_batched for r in teacher)
        console.print(f"{name} learnt from {spec}: {student.ms_per_image_batched:.3f} ms/img (batch {batch}), valid "
                      f"acc {student.valid_accuracy:.4f}; the teacher's {len(teacher)} members together "
                      f"{cost:.3f} ms/img, valid acc of each {', '.join(f'{r.valid_accuracy:.4f}' for r in teacher)}: "
                      f"the student is {cost / student.ms_per_image_batched:.1f}× faster", soft_wrap=True)


@app.command("eval", short_help="Kept members and the ensemble scored on another labelled folder of the same classes.")
def eval_command(ensemble: str = typer.Argument(..., help="the ensemble YAML (members with keep_model: true)"),
                 overrides: Optional[List[str]] = OverridesArg,
                 on: Path = typer.Option(..., "--on", help="a labelled image folder: <class>/*.jpg, the competition's classes"),
                 project: Optional[Path] = ProjectOpt):
    """Does the ensemble hold up beyond the competition's images? The kept members (with their test-time
    augmentation) and the ensemble scored on another labelled folder of the competition's classes (images from
    another source), next to their validation scores. Needs members trained with keep_model: true.

    Example: ens eval digits/final.yaml defaults.keep_model=true --on ~/data/other-digits
    """
    from .evaluate import evaluate_on

    proj = _project(project)
    results, n, g = evaluate_on(proj, ensemble, on, overrides or [])
    table = Table(title=f"{g.path.name} on {on} ({n} images) — and on validation")
    table.add_column("model")
    for name in dict.fromkeys(k for r in results.values() for k in r):
        table.add_column(f"{name} there", justify="right")
        table.add_column("validation", justify="right")
    for model, scores in results.items():
        cells = []
        for name in dict.fromkeys(k for r in results.values() for k in r):
            there, valid = scores.get(name, (None, None))
            cells += ["" if there is None else f"{there:.4f}", "" if valid is None else f"{valid:.4f}"]
        table.add_row(model, *cells)
    console.print(table)


@app.command(short_help="What a member's arch can be: ens's own small nets, timm's, torchvision's, fastai's.")
def models(pattern: Optional[str] = typer.Argument(None, help="an fnmatch pattern, e.g. 'convnext*' or 'ens:*'"),
           pretrained: bool = typer.Option(False, "--pretrained", help="only names with pretrained weights (timm tags)"),
           limit: int = typer.Option(60, "--limit", help="show at most this many (0: all)")):
    """What can be written as a member's `arch`: ens's own small nets trained from scratch (`ens:lenet5`,
    `ens:alexnet_bn`, `ens:cifar_cnn`: for small images such as 32 px digits or CIFAR-sized photos), timm's models
    (deprecated aliases included), torchvision's and fastai's.

    Example: ens models 'convnext_small*' --pretrained
    """
    from .models import list_models

    rows = list_models(pattern, pretrained)
    table = Table(title=f"{len(rows)} architectures" + (f" matching {pattern!r}" if pattern else ""))
    for col in ("name (as written in YAML)", "library", "note"):
        table.add_column(col, no_wrap=col != "note")
    for name, library, note in rows[: limit or None]:
        table.add_row(name, library, note)
    console.print(table)
    if limit and len(rows) > limit:
        console.print(f"... {len(rows) - limit} more: narrow the pattern or pass --limit 0")


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
    from .tune import render, tune_member, write_best

    proj = _project(project)

    def report(row):
        value = "" if row.value is None else f" {row.value:.4f}"
        console.print(f"[green]✓[/] trial {row.number} {row.state}{value} ({row.epochs} epochs)")

    with _progress() as progress:
        result = tune_member(proj, ensemble, member, overrides or [], trials, progress, on_trial=report, fold=fold,
                             parallel=_parallel(parallel, address, gpus_per_member, cpus_per_member))
    render(result, console)
    if write:
        console.print(f"wrote {proj.relative(write_best(result, write))}")


@app.command(short_help="One self-contained HTML report: curves, confusion matrices, ablation, history, mistakes.")
def report(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
           overrides: Optional[List[str]] = OverridesArg,
           cached_only: bool = typer.Option(False, "--cached-only", help="use the cached members only; train nothing"),
           out: Optional[Path] = typer.Option(None, "--out", help="where to write the HTML (default: beside the submissions)"),
           project: Optional[Path] = ProjectOpt):
    """The ensemble as pictures, one self-contained HTML file: members at a glance, training curves, confusion
    matrices and per-class scores, the ablation, member similarity, the submission history, the most confidently
    wrong validation images.

    Example: ens report digits/final.yaml
    """
    import time

    from .report import build_report

    proj = _project(project)
    start = time.perf_counter()
    path = _with_progress(lambda progress, report_member: build_report(
        proj, ensemble, overrides or [], cached_only, out, progress=progress, on_member=report_member))
    console.print(f"wrote {proj.relative(path)} in {time.perf_counter() - start:.1f}s (open it in a browser)")


@app.command(short_help="Write a competition's YAML and a starter ensemble from its data (Kaggle's, or a folder).")
def init(target: str = typer.Argument(..., metavar="SLUG|NAME", help="the Kaggle competition's slug (the last part "
                                      "of its address); with --data, the competition's name"),
         name: Optional[str] = typer.Option(None, "--name", help="the competition's name here (default: the slug)"),
         data_dir: Optional[Path] = typer.Option(None, "--data", metavar="FOLDER", help="read the competition's files "
                                                 "from FOLDER instead of downloading them (no Kaggle calls)"),
         positive_class: Optional[str] = typer.Option(None, "--positive-class", metavar="CLASS", help="the class whose "
                                                      "probability a probability submission holds, when ens cannot tell"),
         pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="the starter's ConvNeXt starts "
                                         "from timm's ImageNet weights (or from scratch)"),
         force: bool = typer.Option(False, "--force", help="overwrite competitions/NAME.yaml and "
                                    "ensembles/NAME/starter.yaml"),
         project: Optional[Path] = ProjectOpt):
    """Write competitions/NAME.yaml and ensembles/NAME/starter.yaml from the competition's data: the layout (class
    folders or a labels CSV), the test folder and ids, the sample submission's columns and kind, the metric, the
    image size. Guessed values carry a `# guessed:` comment to review; what cannot be told is refused, naming the
    field. Both files are then checked as training would check them.

    Examples: ens init paddy-disease-classification --name paddy; ens init --data ~/data/leaves leaves
    """
    from .init import init_competition, summary_lines

    if data_dir is not None and name not in (None, target):
        raise EnsError(f"--name {name} and {target}: with --data, give the name once: ens init --data FOLDER NAME")
    proj = _project(project)
    result = init_competition(proj, name or target, slug=None if data_dir else target, folder=data_dir, force=force,
                              pretrained=pretrained, positive_class=positive_class)
    for line in summary_lines(proj, result):
        console.print(escape(line), highlight=False, soft_wrap=True)


@app.command(short_help="Check an ensemble YAML and its competition without training anything.")
def validate(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
             overrides: Optional[List[str]] = OverridesArg, project: Optional[Path] = ProjectOpt):
    """Check an ensemble (and its competition) without training: keys, types, architectures, member names."""
    from .run import check_ensemble

    proj = _project(project)
    path, ens, comp = check_ensemble(proj, ensemble, overrides or [])
    how = (f", {comp.cv.folds}-fold cross-validation" + (" + refit" if ens.refit == "full" else "")
           if ens.validation == "cv" else "")
    console.print(f"{proj.relative(path)}: ok — {len(ens.members)} members on {comp.name}{how} "
                  f"({', '.join(m.name for m in ens.members)})")


@app.command(short_help="Make a competition's data ready (downloaded from Kaggle, or built) and show its split.")
def data(competition: str = typer.Argument(..., help="a competition name (competitions/NAME.yaml)"),
         project: Optional[Path] = ProjectOpt):
    """Make a competition's data ready (the embedded ones are built) and show its split."""
    from .config import load_competition
    from .data import load_data

    proj = _project(project)
    comp = load_competition(proj, competition)
    d = load_data(proj, comp)
    console.print(f"{comp.name}: {proj.relative(d.root)} — {len(d.train_paths)} training images "
                  f"({sum(d.is_valid)} validation, fixed), {len(d.test_paths)} test images, "
                  f"{len(d.vocab)} classes; fingerprint {d.fingerprint[:12]}")
    from collections import Counter

    from .data import cv_folds

    sizes = Counter(cv_folds(d))
    grouped = f", grouped by {comp.cv.group_column}" if comp.cv.group_column else ""
    console.print(f"cross-validation (ensembles with validation: cv): {comp.cv.folds} folds{grouped} of "
                  f"{', '.join(str(sizes[f]) for f in range(comp.cv.folds))} images")


@app.command(short_help="Check a submission CSV against the sample submission (and score it on local answers).")
def check(csv: Path = typer.Argument(..., help="a submission CSV"),
          competition: str = typer.Option(..., "--competition", "-c", help="the competition it is for"),
          project: Optional[Path] = ProjectOpt):
    """Check a submission CSV against the competition's sample submission (and score it where answers are known)."""
    from .config import load_competition
    from .data import ensure_data, list_train
    from .submission import check_submission, score_submission

    proj = _project(project)
    comp = load_competition(proj, competition)
    root = ensure_data(proj, comp)
    labels = sorted(set(list_train(comp, root)[1]))
    rows = check_submission(csv, root / comp.sample_submission, comp, labels)
    console.print(f"{csv}: ok ({rows} rows)")
    if comp.solution:
        console.print(f"{comp.metric} on the local answers: {score_submission(csv, root / comp.solution, comp):.4f}")


@app.command(short_help="Upload a CSV to Kaggle by hand: checked first, not sent twice, recorded in the history.")
def submit(csv: Path = typer.Argument(..., help="the submission CSV"),
           competition: str = typer.Option(..., "--competition", "-c", help="the competition it is for"),
           message: str = typer.Option(..., "--message", "-m", help="the submission's description on Kaggle"),
           force: bool = typer.Option(False, "--force", help="upload even a CSV identical to one already submitted "
                                      "(or whose upload's outcome is unknown: check `ens submissions` first)"),
           no_wait: bool = typer.Option(False, "--no-wait", help="do not wait for the public score"),
           project: Optional[Path] = ProjectOpt):
    """Upload a CSV to a Kaggle competition by hand (one whose YAML has a `kaggle:` slug): checked against the
    sample submission first, not sent again when the same bytes already were (or may have been) unless --force,
    recorded in the history; then waits for the public score.

    Example: ens submit submissions/paddy/20261127-120000-final.csv -c paddy -m "final, retry"
    """
    from .config import load_competition
    from .data import ensure_data, list_train
    from .submission import check_submission, deliver_to_kaggle

    proj = _project(project)
    comp = load_competition(proj, competition)
    if not comp.kaggle:
        raise EnsError(f"competitions/{comp.name}.yaml has no kaggle slug; add `kaggle: <slug>` to submit there")
    from .notebook.push import takes_notebooks

    if takes_notebooks(comp):
        raise EnsError(f"'{comp.kaggle}' is a code competition: it takes notebooks, not CSV uploads; `ens kaggle "
                       f"push ENSEMBLE --submit` delivers one")
    if not csv.is_file():
        raise EnsError(f"{csv}: no such file")
    root = ensure_data(proj, comp)
    rows = check_submission(csv, root / comp.sample_submission, comp, sorted(set(list_train(comp, root)[1])))
    history = proj.submissions / comp.name / "history.csv"
    shown = proj.relative(csv)
    console.print(f"{shown}: checked ({rows} rows)")
    delivery = deliver_to_kaggle(comp, csv, shown, message, history, force, not no_wait,
                                 record={"ensemble": "(by hand)", "metric": comp.metric})  # records the history row
    if delivery.destination.startswith("not submitted: identical") and not force:
        delivery.error = delivery.note  # asked by hand to submit: refusing is a failure, not a notice
        delivery.note = ""
    _print_delivery(delivery)


@app.command(short_help="A competition's submission history, pending Kaggle scores looked up first.")
def submissions(competition: str = typer.Argument(..., help="a competition name"),
                project: Optional[Path] = ProjectOpt):
    """A competition's submission history: when, which ensemble, validation score, file, where it went, Kaggle's
    ref, status and public score. Kaggle is asked first about pending scores and about uploads of unknown outcome
    (cut off before Kaggle answered: found on Kaggle's list by file name and message, or named with the command
    to resend them)."""
    from .config import load_competition
    from .submission import refresh_history

    proj = _project(project)
    comp = load_competition(proj, competition)
    rows, warning = refresh_history(comp, proj.submissions / comp.name / "history.csv")
    if warning:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not rows:
        console.print(f"no submissions to {comp.name} yet")
        return
    table = Table(title=f"submissions/{comp.name}/history.csv")
    for col in ("time", "ensemble", "valid", "file", "destination", "ref", "status", "score"):
        table.add_column(col, justify="right" if col in ("valid", "score") else "left",
                         no_wrap=col in ("time", "file", "ref"))
    for r in rows:
        valid = f"{float(r['valid_score']):.4f}" if r.get("valid_score") else ""
        score = f"{float(r['score']):.5f}" if r.get("score") else ""
        destination = r.get("destination", "") + (f" {r['notebook']}" if r.get("notebook") else "")
        table.add_row(r["time"][:16].replace("T", " "), r.get("ensemble", ""), valid, Path(r["file"]).name,
                      destination, r.get("ref", ""), r.get("status", ""), score)
    console.print(table)
    for r in rows:  # why Kaggle could not score them, and what to do
        if r.get("status") in ("error", "notebook error") and r.get("note"):
            console.print(f"{r['time'][:16].replace('T', ' ')} {r.get('ref') or r.get('notebook')}: "
                          f"{escape(r['note'])}", highlight=False, soft_wrap=True)


def _say(text: str) -> None:
    err.print(escape(text), highlight=False, soft_wrap=True)


@kaggle_app.command("push", short_help="Check the ensemble's notebook here, upload its weights, push it (--submit: "
                    "and submit it).")
def kaggle_push(ensemble: str = typer.Argument(..., help="the ensemble YAML of a code competition"),
                overrides: Optional[List[str]] = OverridesArg,
                submit: bool = typer.Option(False, "--submit", help="submit the notebook's version once it has run"),
                no_wait: bool = typer.Option(False, "--no-wait", help="push and return; `ens kaggle status` follows it"),
                runtime_check: bool = typer.Option(True, "--runtime-check/--no-runtime-check", help="refuse a "
                                                   "notebook estimated at over 90% of the competition's runtime limit"),
                project: Optional[Path] = ProjectOpt):
    """Deliver an ensemble to a code competition (`submission: notebook` in its YAML, or `auto`): members not cached
    are trained, their kept weights, a manifest and ens itself go into a private Kaggle dataset (uploaded only when
    its content changed, then checked file by file), and a notebook with internet off that predicts whatever test
    images Kaggle gives it is pushed and followed until it has run; with --submit its version is then submitted.
    Before anything is uploaded the notebook runs here, offline, and must write the CSV `ens run` writes; its time
    is scaled to the hidden test set (notebook.hidden_test_images) against the runtime limit.

    Example: ens kaggle push leaves/final.yaml --submit
    """
    _run_and_show(_project(project), ensemble, overrides or [], submit=submit, wait=not no_wait, push=True,
                  notebook={"check_runtime": runtime_check})


@kaggle_app.command("status", short_help="Follow the competition's notebooks still running on Kaggle; fetch, check "
                    "and submit them when done.")
def kaggle_status(competition: str = typer.Argument(..., help="a competition name"),
                  wait: bool = typer.Option(False, "--wait", help="wait for each until it has run"),
                  project: Optional[Path] = ProjectOpt):
    """The notebooks pushed by `ens kaggle push` (or `ens run`) that were still running when ens stopped following
    them (Ctrl-C, --no-wait): their state on Kaggle; once one has run, its CSV is fetched and checked, and submitted
    when the push asked for it."""
    from .config import load_competition
    from .notebook.push import follow_up

    proj = _project(project)
    comp = load_competition(proj, competition)
    found = follow_up(proj, comp, wait, say=_say)
    if not found:
        console.print(f"no notebook of {comp.name} is running on Kaggle (`ens submissions {comp.name}` lists them all)")
    failed = []
    for notebook, delivery in found:
        console.print(f"{notebook}: {escape(delivery.note or delivery.error or delivery.status)}", highlight=False,
                      soft_wrap=True)
        if delivery.error:
            failed.append(delivery.error)
    if failed:
        raise EnsError(failed[0])


@kaggle_app.command("submit", short_help="Submit a notebook version that ran (owner/slug/version).")
def kaggle_submit(competition: str = typer.Argument(..., help="a competition name"),
                  notebook: str = typer.Argument(..., help="owner/slug/version, as `ens submissions` lists it"),
                  message: Optional[str] = typer.Option(None, "--message", "-m", help="the submission's description"),
                  project: Optional[Path] = ProjectOpt):
    """Submit a pushed notebook's version that ran on Kaggle and wrote a checked CSV (`ens kaggle push` without
    --submit), then wait for its score."""
    from .config import load_competition
    from .notebook.push import submit_ran

    proj = _project(project)
    _print_delivery(submit_ran(proj, load_competition(proj, competition), notebook, message, say=_say))


@cache_app.command("ls")
def cache_ls(competition: Optional[str] = typer.Argument(None, help="only this competition"),
             project: Optional[Path] = ProjectOpt):
    """List cached members: key, arch, size, epochs, validation accuracy, when and how long; a cross-validated
    member's fold models in one row (their folds, mean fold accuracy, summed time and size)."""
    from .cache import MemberCache

    proj = _project(project)
    names = [competition] if competition else sorted(
        p.name for p in proj.cache.iterdir() if p.is_dir() and (proj.competitions / f"{p.name}.yaml").exists()
    ) if proj.cache.is_dir() else []
    rows = [(name, *_cache_row(group)) for name in names
            for group in _cache_groups(MemberCache(proj.cache, name).entries())]
    cv = any(folds.startswith("folds") for *_, folds in rows)  # the column only where some member is cross-validated
    table = Table(title=f"{proj.relative(proj.cache)}/")
    for col in ("competition", "key", "member", "arch", *(("folds",) if cv else ()), "size", "epochs", "valid acc",
                "TTA acc", "train", "created", "MB"):
        table.add_column(col, no_wrap=col in ("key", "arch", "folds", "created"))
    for name, cells, folds in rows:
        table.add_row(name, *cells[:3], *((folds,) if cv else ()), *cells[3:])
    console.print(table if rows else "no cached members yet")


def _cache_groups(metas: list[dict]) -> list[list[dict]]:
    """The entries in listing order, a cross-validated member's fold models (and refit) gathered into one group:
    same member name, fold assignment and config (`key_fields`). Holdout and damaged entries stand alone."""
    import json

    groups: dict = {}
    for i, meta in enumerate(metas):
        try:
            cv = None if meta.get("damaged") else meta.get("cv")
            same = json.dumps(meta["key_fields"], sort_keys=True)  # other settings: other fold models
            key = (meta["member"]["name"], cv["assignment"], same) if cv else i
        except (KeyError, TypeError, ValueError):
            key = i
        groups.setdefault(key, []).append(meta)
    return list(groups.values())


def _cache_row(group: list[dict]) -> tuple[list[str], str]:
    """(the cells from key to MB, the folds cell: 'holdout', '' when damaged) of an entry or of a fold group; the
    accuracy is the mean over the fold models (a refit has no validation images)."""
    first = group[0]
    damaged = [first.get("key", "?"), "[red]damaged[/]", *[""] * 8], ""
    if first.get("damaged"):
        return damaged
    try:
        m, k, cv = first["member"], first["key_fields"], first.get("cv")
        folds = sorted((e for e in group if cv and e["cv"]["fold"] != "refit"), key=lambda e: e["cv"]["fold"])
        refit = [e for e in group if e not in folds] if cv else []
        scored = folds if cv else group

        def acc(name: str) -> str:
            values = [e["metrics"][name] for e in scored if name in e["metrics"]]
            return f"{sum(values) / len(values):.4f}" if values else ""

        keys = [e["key"] for e in folds + refit] if cv else [first["key"]]
        cells = [keys[0] + (f" +{len(keys) - 1}" if len(keys) > 1 else ""), m["name"], m["arch"],
                 str(k["stages"][-1][0]), str(sum(e for _, e in k["stages"])), acc("plain_accuracy"),
                 acc("tta_accuracy"), f"{sum(e['timings']['train_seconds'] for e in group):.0f}s",
                 max(e["created"] for e in group)[:16].replace("T", " "), f"{sum(e['bytes'] for e in group) / 1e6:.2f}"]
    except (KeyError, TypeError, ValueError, AttributeError):  # a meta.json of an older format: as unusable
        return damaged
    if not cv:
        return cells, "holdout"
    listed = f" ({', '.join(str(e['cv']['fold']) for e in folds)})" if folds else ""
    return cells, f"folds {len(folds)}/{cv['folds']}{listed}" + (" + refit" if refit else "")


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # said at import, not ours to fix
    try:
        app()
    except EnsError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:  # typer turns Ctrl-C inside a command into a silent exit 130
        if e.code == 130 and _caused_by_ctrl_c(e):
            _interrupted()
        raise


def _caused_by_ctrl_c(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def _interrupted():
    err.print("interrupted: finished members are cached (and an unfinished one's last epoch); run the same command "
              "again to go on")
    sys.exit(130)


if __name__ == "__main__":
    main()
