"""Verbs that read what was trained: `ens ablate`, `ens report`, `ens bench`, `ens eval`, `ens models`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..config import Project
from ..errors import EnsError
from ..util import spread
from .app import (
    OverridesArg,
    ProjectOpt,
    _print_delivery,
    _project,
    _with_progress,
    app,
    console,
)


@app.command(short_help="What each member adds, from cached validation predictions (no training); pick a subset.")
def ablate(ensemble: str = typer.Argument(..., help="the ensemble YAML"),
           overrides: Optional[List[str]] = OverridesArg,
           cached_only: bool = typer.Option(False, "--cached-only", help="use the cached members only; train nothing"),
           top: int = typer.Option(10, "--top", help="how many of the best subsets to show"),
           probs: Optional[str] = typer.Option(None, "--probs", help="tta or plain (default: the ensemble's)"),
           rounds: Optional[int] = typer.Option(None, "--rounds", help="greedy selection's and hill "
                                                "climbing's rounds in every table (default: the ensemble's combine.rounds)"),
           pick: str = typer.Option("greedy", "--pick", help="what --write/--submit use: greedy (combine: greedy with "
                                    "these rounds), subset (the best), or a combine method (mean, hill_climb, rank, "
                                    "power, stack) over every member; each scored by nested cross-validation"),
           write: Optional[Path] = typer.Option(None, "--write", help="write the chosen members and weights as an ensemble YAML"),
           submit: bool = typer.Option(False, "--submit", help="write, check, record (and upload, as `ens run` does) the chosen blend's submission"),
           force: bool = typer.Option(False, "--force", help="with --submit: upload even a CSV already submitted"),
           project: Optional[Path] = ProjectOpt):
    """What does each member add? Scores from the cached validation probabilities: each member alone, the ensemble
    without each, every subset, greedy selection with weights, and how alike the members' errors are.

    Example: ens ablate digits/final.yaml --top 5 --write ensembles/digits/selected.yaml
    """
    from ..ablate import ablate as run_ablation
    from ..ablate import write_selection
    from ..run import blend_and_submit

    _at_least_one(top=top, rounds=rounds)
    if probs not in (None, "tta", "plain"):
        raise EnsError(f"--probs {probs}: choose tta or plain")
    from ..config import COMBINE_METHODS

    if pick not in ("greedy", "subset", *COMBINE_METHODS):
        raise EnsError(f"--pick {pick}: choose greedy, subset, or a combine method ({', '.join(COMBINE_METHODS)})")
    proj = _project(project)
    result = _with_progress(lambda progress, report: run_ablation(
        proj, ensemble, overrides or [], cached_only, probs, rounds, progress, report))
    _print_ablation(result, top)
    if write:
        dest = write_selection(result, overrides or [], write, pick)
        console.print(f"wrote {proj.shown(dest)}")
    if submit:
        chosen, weights = result.pick(pick)
        blend = blend_and_submit(proj, result.gathered, chosen, weights, f"{result.gathered.path.stem}-{pick}",
                                 result.probs, force=force, combine=result.combine(pick))
        console.print(f"{blend.unchanged or 'submission: ' + proj.shown(blend.csv)} ({blend.rows} rows, checked "
                      "against the sample); "
                      f"valid {result.metric} {blend.valid_score:.4f}"
                      + (f", test {blend.test_score:.4f}" if blend.test_score is not None else ""))
        _print_delivery(blend.delivery)


def _at_least_one(**options: int | None) -> None:
    """Counts checked before any training: `--batch 0` would fail only once the members are ready (None: not
    given, the default applies)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise EnsError(f"--{name} {value}: give a whole number of at least 1")


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
    from ..ensemble import GREATER_IS_BETTER

    over = f"the {r.n_folds} folds" if r.gathered.cv else f"{r.n_folds} parts of the holdout"
    console.print(f"\n[bold]combine methods[/] (`combine:` in the ensemble; this one's is "
                  f"{r.gathered.ensemble.combine.method}; greedy and hill climbing: {r.greedy_rounds} rounds). A learned blend's weights are chosen on the rows it is "
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
    over = ("the images and 'p' McNemar's exact test of the hits" if r.n_groups is None else
            f"whole groups ({r.n_groups} {g.competition.cv.group_column}s, resampled as units: their images are not "
            "independent) and 'p' McNemar's test clustered by group (Durkalski)")
    console.print(f"[bold]{g.path.name}[/] on {g.competition.name}: {r.metric} on {rows} ({r.probs} probabilities); "
                  f"one image is {1 / r.n_valid:.4f}. 'changed' counts the images whose predicted label differs from "
                  f"the full ensemble's (+ now right, − now wrong); '95% CI' is a paired bootstrap interval of Δ over "
                  f"{over}: an interval holding 0, or a large p, is not a difference shown.", soft_wrap=True)
    from ..crossval import unit_name

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
    cis = [ci for row in r.members for ci in (row.alone_interval, row.without_interval) if ci is not None]
    lacking, dropped = max(getattr(ci, "lacking", 0) for ci in cis), max(getattr(ci, "dropped", 0) for ci in cis)
    if lacking:
        console.print(f"note: up to {lacking} of the bootstrap samples lacked a class ({r.metric} over the classes "
                      f"present there){f'; {dropped} had a single class and no score, left out' if dropped else ''}")
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
                  f"{r.greedy_score:.4f} in-sample (log loss {r.greedy_log_loss:.4f}), {r.greedy_honest:.4f} nested"
                  + (f"; best subset {r.subset_honest:.4f} nested" if r.subset_honest is not None else ""))
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
    from ..evaluate import bench, write_bench_csv

    _at_least_one(batch=batch)
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
    console.print(f"wrote {proj.shown(dest)}")


def _competition_of(proj: Project, ensemble: str, overrides) -> str:
    from ..config import load_ensemble

    return load_ensemble(proj, ensemble, overrides or [])[2].name


def _print_teachers(proj: Project, ensemble: str, overrides: list[str], rows, batch: int) -> None:
    """A distilled (or pseudo-labelled) member beside its teacher ensemble: what the student saves at inference."""
    from ..evaluate import bench, teachers

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
    from ..evaluate import evaluate_on

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

    from ..report import build_report

    if out is not None:  # found only when the page is written, after the training
        _check_report_path(out)
    proj = _project(project)
    start = time.perf_counter()
    path = _with_progress(lambda progress, report_member: build_report(
        proj, ensemble, overrides or [], cached_only, out, progress=progress, on_member=report_member))
    console.print(f"wrote {proj.shown(path)} in {time.perf_counter() - start:.1f}s (open it in a browser)")


@app.command(short_help="What a member's arch can be: ens's own small nets, timm's, torchvision's, fastai's.")
def models(pattern: Optional[str] = typer.Argument(None, help="an fnmatch pattern, e.g. 'convnext*' or 'ens:*'"),
           pretrained: bool = typer.Option(False, "--pretrained", help="only names with pretrained weights (timm tags)"),
           limit: int = typer.Option(60, "--limit", help="show at most this many (0: all)")):
    """What can be written as a member's `arch`: ens's own small nets trained from scratch (`ens:lenet5`,
    `ens:alexnet_bn`, `ens:cifar_cnn`: for small images such as 32 px digits or CIFAR-sized photos), timm's models
    (deprecated aliases included), torchvision's and fastai's.

    Example: ens models 'convnext_small*' --pretrained
    """
    from ..models import list_models

    rows = list_models(pattern, pretrained)
    table = Table(title=f"{len(rows)} architectures" + (f" matching {pattern!r}" if pattern else ""))
    for col in ("name (as written in YAML)", "library", "note"):
        table.add_column(col, no_wrap=col != "note")
    for name, library, note in rows[: limit or None]:
        table.add_row(name, library, note)
    console.print(table)
    if limit and len(rows) > limit:
        console.print(f"... {len(rows) - limit} more: narrow the pattern or pass --limit 0")


def _check_report_path(out: Path) -> None:
    """`--out` names an HTML file ens may write (or replace: an earlier report), in a folder that exists."""
    if out.is_dir():
        raise EnsError(f"--out {out}: is a folder; give the HTML file's path, e.g. --out {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise EnsError(f"--out {out}: a report is an .html file; give a path ending in .html (an existing file of "
                       "another kind is never replaced)")
    if out.exists() and not out.is_file():
        raise EnsError(f"--out {out}: exists and is not a regular file; give another path")
    if not out.parent.is_dir():
        raise EnsError(f"--out {out}: no folder {out.parent}; create it first or give another path")
