"""Submissions and Kaggle: `ens check`, `ens submit`, `ens submissions`, `ens kaggle push|status|submit`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EnsError
from .app import (
    OverridesArg,
    ProjectOpt,
    _print_delivery,
    _project,
    _say,
    app,
    console,
    err,
    kaggle_app,
)
from .run import _run_and_show


@app.command(short_help="Check a submission CSV against the sample submission (and score it on local answers).")
def check(csv: Path = typer.Argument(..., help="a submission CSV"),
          competition: str = typer.Option(..., "--competition", "-c", help="the competition it is for"),
          project: Optional[Path] = ProjectOpt):
    """Check a submission CSV against the competition's sample submission (and score it where answers are known)."""
    from ..config import load_competition
    from ..data import ensure_data, list_train
    from ..submission import check_submission, score_submission

    proj = _project(project)
    comp = load_competition(proj, competition)
    csv = _csv_file(proj, csv)
    root = ensure_data(proj, comp)
    labels = sorted(set(list_train(comp, root)[1]))
    rows = check_submission(csv, root / comp.sample_submission, comp, labels)
    console.print(f"{csv}: ok ({rows} rows)")
    if comp.solution:
        console.print(f"{comp.metric} on the local answers: {score_submission(csv, root / comp.solution, comp):.4f}")


def _csv_file(proj, csv: Path) -> Path:
    """The CSV `csv` names: from the current folder, else from the project's (the paths in history.csv)."""
    if csv.is_file():
        return csv
    if not csv.is_absolute() and (proj.root / csv).is_file():
        return proj.root / csv
    state = "is a folder" if csv.is_dir() else "no such file"
    raise EnsError(f"{csv}: {state} (looked in the current folder and in the project {proj.root}); "
                   f"`ens submissions COMPETITION` lists the CSVs written")


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
    from ..config import load_competition
    from ..data import ensure_data, list_train
    from ..submission import check_submission, deliver_to_kaggle

    proj = _project(project)
    comp = load_competition(proj, competition)
    if not comp.kaggle:
        raise EnsError(f"competitions/{comp.name}.yaml has no kaggle slug; add `kaggle: <slug>` to submit there")
    from ..notebook.push import takes_notebooks

    if takes_notebooks(comp):
        raise EnsError(f"'{comp.kaggle}' is a code competition: it takes notebooks, not CSV uploads; `ens kaggle "
                       f"push ENSEMBLE --submit` delivers one")
    csv = _csv_file(proj, csv)
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
    from ..config import load_competition
    from ..submission import refresh_history

    proj = _project(project)
    comp = load_competition(proj, competition)
    rows, warning = refresh_history(comp, proj.submissions / comp.name / "history.csv")
    if warning:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not rows:
        console.print(f"no submissions to {comp.name} yet")
        return
    table = Table(title=f"submissions/{comp.name}/history.csv")
    for col in ("time", "ensemble", "overrides", "hash", "valid", "file", "destination", "ref", "status", "score"):
        table.add_column(col, justify="right" if col in ("valid", "score") else "left",
                         no_wrap=col in ("time", "overrides", "hash", "file", "ref"),  # what tells runs apart, whole
                         overflow="fold")  # a path too long for its column is folded onto the next line, not cut
    for r in rows:
        valid = f"{float(r['valid_score']):.4f}" if r.get("valid_score") else ""
        score = f"{float(r['score']):.5f}" if r.get("score") else ""
        destination = r.get("destination", "") + (f" {r['notebook']}" if r.get("notebook") else "")
        table.add_row(r["time"][:16].replace("T", " "), r.get("ensemble", ""), r.get("overrides") or "",
                      (r.get("ensemble_hash") or "")[:8], valid, Path(r["file"]).name,
                      destination, r.get("ref", ""), r.get("status", ""), score)
    console.print(table)
    for r in rows:  # why Kaggle could not score them, and what to do
        if r.get("status") in ("error", "notebook error") and r.get("note"):
            console.print(f"{r['time'][:16].replace('T', ' ')} {r.get('ref') or r.get('notebook')}: "
                          f"{escape(r['note'])}", highlight=False, soft_wrap=True)


@kaggle_app.command("push", short_help="Check the ensemble's notebook here, upload its weights, push it (--submit: "
                    "and submit it).")
def kaggle_push(ensemble: str = typer.Argument(..., help="the ensemble YAML of a code competition"),
                overrides: Optional[List[str]] = OverridesArg,
                submit: bool = typer.Option(False, "--submit", help="submit the notebook's version once it has run"),
                no_wait: bool = typer.Option(False, "--no-wait", help="push and return; `ens kaggle status` follows it"),
                runtime_check: bool = typer.Option(True, "--runtime-check/--no-runtime-check", help="refuse a "
                                                   "notebook estimated at over 90% of the competition's runtime limit"),
                force: bool = typer.Option(False, "--force", help="with --submit: submit even when the CSV of "
                                           "Kaggle's run differs from the one checked here"),
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
                  force=force, notebook={"check_runtime": runtime_check})


@kaggle_app.command("status", short_help="Follow the competition's notebooks still running on Kaggle; fetch, check "
                    "and submit them when done.")
def kaggle_status(competition: str = typer.Argument(..., help="a competition name"),
                  wait: bool = typer.Option(False, "--wait", help="wait for each until it has run"),
                  project: Optional[Path] = ProjectOpt):
    """The notebooks pushed by `ens kaggle push` (or `ens run`) that were still running when ens stopped following
    them (Ctrl-C, --no-wait): their state on Kaggle; once one has run, its CSV is fetched and checked, and submitted
    when the push asked for it. Training notebooks (`ens run --on kaggle`) that have ended: their units' entries
    fetched, verified and moved into the cache (`ens run ... --on kaggle` then blends them)."""
    from ..config import load_competition
    from ..notebook.push import follow_up

    from ..remote.runs import follow_up as follow_training

    proj = _project(project)
    comp = load_competition(proj, competition)
    training = follow_training(proj, comp, wait, say=_say)  # `ens run --on kaggle`'s notebooks
    for row in training:
        console.print(f"{row['notebook']}/{row['version']} (training): {escape(row.get('note') or row['status'])}",
                      highlight=False, soft_wrap=True)
    found = follow_up(proj, comp, wait, say=_say)
    if not found and not training:
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
                  force: bool = typer.Option(False, "--force", help="submit a version whose CSV differs from the one "
                                             "checked here (recorded as a notebook error)"),
                  project: Optional[Path] = ProjectOpt):
    """Submit a pushed notebook's version that ran on Kaggle and wrote a checked CSV (`ens kaggle push` without
    --submit), then wait for its score."""
    from ..config import load_competition
    from ..notebook.push import submit_ran

    proj = _project(project)
    _print_delivery(submit_ran(proj, load_competition(proj, competition), notebook, message, say=_say, force=force))
