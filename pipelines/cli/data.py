"""Competitions' data and the cache: `ens init`, `ens data`, `ens cache ls`, `ens cache prune`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EnsError
from .app import ProjectOpt, _project, app, cache_app, console, err


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
    from ..init import init_competition, summary_lines

    if data_dir is not None and name not in (None, target):
        raise EnsError(f"--name {name} and {target}: with --data, give the name once: ens init --data FOLDER NAME")
    proj = _project(project)
    result = init_competition(proj, name or target, slug=None if data_dir else target, folder=data_dir, force=force,
                              pretrained=pretrained, positive_class=positive_class)
    for line in summary_lines(proj, result):
        console.print(escape(line), highlight=False, soft_wrap=True)


@app.command(short_help="Make a competition's data ready (downloaded from Kaggle, or built) and show its split.")
def data(competition: str = typer.Argument(..., help="a competition name (competitions/NAME.yaml)"),
         project: Optional[Path] = ProjectOpt):
    """Make a competition's data ready (the embedded ones are built) and show its split."""
    from ..config import load_competition
    from ..data import load_data

    proj = _project(project)
    comp = load_competition(proj, competition)
    d = load_data(proj, comp)
    console.print(f"{comp.name}: {proj.relative(d.root)} — {len(d.train_paths)} training images "
                  f"({sum(d.is_valid)} validation, fixed), {len(d.test_paths)} test images, "
                  f"{len(d.vocab)} classes; fingerprint {d.fingerprint[:12]}")
    from collections import Counter

    from ..data import cv_folds

    sizes = Counter(cv_folds(d))
    grouped = f", grouped by {comp.cv.group_column}" if comp.cv.group_column else ""
    console.print(f"cross-validation (ensembles with validation: cv): {comp.cv.folds} folds{grouped} of "
                  f"{', '.join(str(sizes[f]) for f in range(comp.cv.folds))} images")


@cache_app.command("ls")
def cache_ls(competition: Optional[str] = typer.Argument(None, help="only this competition"),
             project: Optional[Path] = ProjectOpt):
    """List cached members: key, arch, size, epochs, validation accuracy, when and how long, the entry's size and
    its kept weights' (keep_model: true); a cross-validated member's fold models in one row (their folds, mean
    fold accuracy, summed time and sizes)."""
    from ..cache import MemberCache

    proj = _project(project)
    if competition and not (proj.competitions / f"{competition}.yaml").is_file() \
            and not (proj.cache / competition).is_dir():  # a typo, not an empty cache
        known = sorted(p.stem for p in proj.competitions.glob("*.yaml"))
        raise EnsError(f"no competition '{competition}' (competitions/{competition}.yaml) and nothing cached under "
                       f"{proj.relative(proj.cache)}/{competition}/; known: {', '.join(known) or 'none'}")
    names = [competition] if competition else sorted(
        p.name for p in proj.cache.iterdir() if p.is_dir() and (proj.competitions / f"{p.name}.yaml").exists()
    ) if proj.cache.is_dir() else []
    rows = [(name, *_cache_row(group)) for name in names
            for group in _cache_groups(MemberCache(proj.cache, name).entries())]
    cv = any(folds.startswith("folds") for *_, folds in rows)  # the column only where some member is cross-validated
    one = len({name for name, *_ in rows}) == 1  # one competition: named in the title, room for the sizes
    table = Table(title=f"{proj.relative(proj.cache)}/" + (f"{rows[0][0]}/" if rows and one else ""))
    for col in (*(() if one else ("competition",)), "key", "member", "arch", *(("folds",) if cv else ()), "size",
                "epochs", "valid acc", "TTA acc", "train", "created", "MB", "weights"):  # MB: the entry's, and its kept weights'
        table.add_column(col, no_wrap=col in ("key", "arch", "folds", "created", "MB", "weights"))
    for name, cells, folds in rows:
        table.add_row(*(() if one else (name,)), *cells[:3], *((folds,) if cv else ()), *cells[3:])
    console.print(table if rows else "no cached members yet")
    if rows:  # weights shared by entries of one training key (another TTA) counted once
        metas = [m for name in names for m in MemberCache(proj.cache, name).entries()]
        weights = {m.get("train_key"): m.get("weights_bytes", 0) for m in metas}
        console.print(f"in all: entries {sum(m.get('bytes', 0) for m in metas) / 1e6:.1f} MB, kept weights "
                      f"{sum(weights.values()) / 1e6:.1f} MB", highlight=False)


@cache_app.command("prune")
def cache_prune(delete: bool = typer.Option(False, "--yes", "--delete", help="delete them (default: only list them)"),
                entries: bool = typer.Option(False, "--entries", help="also cache entries and kept weights that no "
                                             "ensemble YAML of the project uses"),
                project: Optional[Path] = ProjectOpt):
    """List what the cache holds that no run will read again, with sizes: interrupted trainings' checkpoints whose
    member is done or gone, damaged entries moved aside, decoded and prepared copies no member reads, older
    notebook datasets. Nothing a running ens holds, nor anything an ensemble YAML uses, is deleted."""
    from ..prune import find_leftovers, prune

    proj = _project(project)
    found, notes = find_leftovers(proj, entries)
    for note in notes:
        err.print(f"note: {escape(note)}", highlight=False)
    gone = {id(item) for item in prune(found, proj.cache)} if delete else set()
    table = Table(title=f"{proj.relative(proj.cache)}/: " + ("deleted" if delete else "would delete (a dry run)"))
    for col in ("path", "MB", "why"):
        table.add_column(col, no_wrap=col != "why", justify="right" if col == "MB" else "left")
    for item in found:
        kept = item.in_use or (delete and id(item) not in gone)
        table.add_row(escape(proj.relative(item.path)), f"{item.bytes / 1e6:.1f}",
                      escape(item.why) + (" [yellow](in use by a running ens: kept)[/]" if kept else ""))
    freed = sum(item.bytes for item in found if not item.in_use and (not delete or id(item) in gone))
    console.print(table if found else "nothing to prune")
    if found:
        console.print(f"{'freed' if delete else 'would free'} {freed / 1e6:.1f} MB"
                      + ("" if delete else "; `ens cache prune --yes` deletes them"), highlight=False)


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
    damaged = [first.get("key", "?"), "[red]damaged[/]", *[""] * 9], ""
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
                 max(e["created"] for e in group)[:16].replace("T", " "), f"{sum(e['bytes'] for e in group) / 1e6:.2f}",
                 f"{sum(e.get('weights_bytes', 0) for e in group) / 1e6:.2f}"]
    except (KeyError, TypeError, ValueError, AttributeError):  # a meta.json of an older format: as unusable
        return damaged
    if not cv:
        return cells, "holdout"
    listed = f" ({', '.join(str(e['cv']['fold']) for e in folds)})" if folds else ""
    return cells, f"folds {len(folds)}/{cv['folds']}{listed}" + (" + refit" if refit else "")
