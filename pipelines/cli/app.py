"""The `ens` application and what its verbs share: the Typer apps, the consoles, the common options and the
progress display."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..config import PROJECT_ENV, Project
from ..errors import EnsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ensembles of image classifiers for image-classification competitions (Kaggle's, or your own "
                       "labelled folders; one label per image, or one class's probability), described in YAML: each "
                       "member trained once and cached, their test-time-augmented predictions averaged into a "
                       "submission CSV checked against the competition's sample submission, and uploaded to Kaggle "
                       "when the competition names one.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"ens {version('ens')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                               help="Print ens's version and exit.")) -> None:
    """Ensembles of image classifiers for image-classification competitions, described in YAML."""


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
                                "Ray cluster (one GPU each where there are GPUs); needs ens\\[ray] "
                                "(pip install 'ens\\[ray]')")  # \\[: Rich would take [ray] for markup and drop it
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
    from ..schedule import Parallel

    return Parallel(n=n, address=address, gpus_per_member=gpus, cpus_per_member=cpus)


def _progress():
    """The progress display of long verbs: members, epochs, batches, trials (transient: gone when done). Redrawn
    ten times a second on a terminal; into a file or a pipe (logs, `nohup`, a benchmark) nothing is drawn, so no
    redrawing thread is started there: it would only build tables nobody sees, and wake beside the training."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True,
                    auto_refresh=console.is_terminal or console.is_jupyter)


def _with_progress(work):
    """Run `work(progress, report)` under a rich progress display; `report` prints one line per member."""

    def report(outcome):
        from ..crossval import unit_name

        m, metrics = outcome.member, outcome.entry.meta.get("metrics") or {}
        how = _how(outcome)
        if outcome.trained:  # both parts, as the table's train+TTA column sums them
            timings = outcome.entry.meta["timings"]
            how += (f" in {timings['train_seconds']:.1f}s"
                    + (f" + {timings['predict_seconds']:.1f}s TTA" if "predict_seconds" in timings else ""))
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


def _say(text: str) -> None:
    err.print(escape(text), highlight=False, soft_wrap=True)


def _how(outcome) -> str:
    """Where a member's probabilities came from, for the results: cached, trained, resumed (where), predicted
    (from kept weights: a new TTA), derived (another TTA beta from cached arrays)."""
    how = outcome.how
    if how == "resumed":
        how += f" ({outcome.entry.meta.get('resumed_at')})"
    return how


def _print_delivery(delivery) -> None:
    """The Kaggle outcome: a note, or the one-line error and a non-zero exit (the CSV and its history stay)."""
    if delivery.note:
        console.print(f"kaggle: {escape(delivery.note)}", highlight=False, soft_wrap=True)
    if delivery.error:
        raise EnsError(delivery.error)
