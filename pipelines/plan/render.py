"""`ens plan`'s tables and lines, from a `Plan`."""

from __future__ import annotations

from typing import Optional

from ..data.decoded import decoded_bytes  # noqa: F401 - the plan prints it (tests import it from here)
from .build import DecodedCopy, MemberPlan, Plan
from .estimate import PLACEHOLDER_CLASSES, _text


# --------------------------------------------------------------------------------------------- printing
def _si(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _flop(n: float) -> str:
    """5.94e15 → '5.94 PFLOP'."""
    text = _si(n)
    return f"{text[:-1]} {text[-1]}FLOP" if text[-1:].isalpha() else f"{text} FLOP"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _time(unit) -> str:
    """A member's or fold model's time: measured in parentheses when cached, else the estimate."""
    if unit.cached:
        return f"({_duration(unit.cached_seconds)})" if unit.cached_seconds is not None else ""
    return ("~" if unit.est_approx and unit.est_seconds is not None else "") + _duration(unit.est_seconds)


def _unit_status(unit) -> str:
    if not unit.known:
        return "unknown"
    return "cached" if unit.cached else "to predict" if unit.weights_kept else "to train"


_COLOURS = {"cached": "green", "to predict": "cyan", "to train": "yellow", "unknown": "magenta"}


def _status(m: MemberPlan) -> str:
    """'cached' | 'to predict' | 'to train' | 'unknown' (no data); cv: e.g. '1/3 folds cached, 2 to train, refit
    to train'."""
    if not m.known:
        return "[magenta]unknown[/]"
    if not m.folds:
        status = _unit_status(m)
        return f"[{_COLOURS[status]}]{status}[/]"
    folds = [u for u in m.folds if u.fold != "refit"]
    counts = {s: sum(_unit_status(u) == s for u in folds) for s in _COLOURS}
    parts = [f"{counts['cached']}/{len(folds)} folds cached"]
    parts += [f"{counts[s]} {s}" for s in ("to predict", "to train") if counts[s]]
    parts += [f"refit {_unit_status(u)}" for u in m.folds if u.fold == "refit"]
    colour = "green" if m.cached else "cyan" if m.weights_kept else "yellow"
    return f"[{colour}]{', '.join(parts)}[/]"


def _count(n: Optional[int], approx: bool) -> str:
    return "?" if n is None else f"≈{n}" if approx else str(n)


def _fold_table(plan: Plan):
    """Members × fold models: each cached (its time) or to compute (its estimate), under the fold's sizes."""
    from rich.table import Table

    approx = not plan.data_known
    table = Table(title=f"fold models ({plan.folds} folds of {_count(plan.n_train, approx)} training images)")
    table.add_column("member")
    for u in plan.members[0].folds:
        valid = f", {_count(u.n_valid, approx)} valid" if u.n_valid or (approx and u.fold != "refit") else ""
        name = "refit" if u.fold == "refit" else f"fold {u.fold}"
        table.add_column(f"{name}\n{_count(u.n_train, approx)} train{valid}", justify="right")
    for m in plan.members:
        cells = []
        for u in m.folds:
            status = _unit_status(u)
            cells.append(f"[{_COLOURS[status]}]{status}[/] {_time(u)}")
        table.add_row(m.name, *cells)
    return table


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _title(plan: Plan) -> str:
    folds = f" in {plan.folds} folds" if plan.folds else ""
    if plan.data_known:
        images = f"{plan.n_train} training images{folds}"
    elif plan.n_train is not None:
        images = f"≈{plan.n_train} training images{folds} by expected:, data not downloaded"
    else:
        images = f"data not downloaded{folds}"
    return f"{plan.path.name} on {plan.competition.name}: plan on {plan.device} ({images})"


def _summary(plan: Plan) -> str:
    """The members line: cached / to predict / to train, and the estimated time."""
    if not plan.data_known:
        line = f"{len(plan.members)} members: cached or not is unknown until the data is downloaded"
        todo = plan.unknown
        them = "them all"
    else:
        todo = plan.to_train
        kept = sum(m.weights_kept for m in plan.members)
        line = (f"{len(plan.members)} members: {len(plan.members) - len(todo) - kept} cached, "
                + (f"{kept} to predict (weights kept), " if kept else "") + f"{len(todo)} to train")
        if plan.folds:
            units = [u for m in plan.members for u in m.folds]
            line += (f" ({sum(not u.cached and not u.weights_kept for u in units)} of {len(units)} fold models to "
                     "train)")
        them = ""
    if todo:
        known = [m.est_seconds for m in todo if m.est_seconds is not None]
        approx = "~" if plan.est_from else ""
        if plan.est_seconds is not None:
            line += f"; estimated {approx}{_duration(plan.est_seconds)}" + (f" to train {them}" if them else "")
        elif known:
            line += f"; estimated {approx}{_duration(sum(known))} for {len(known)} of them"
        if len(known) < len(todo) and plan.counts_from is None:
            line += "; no time estimate (the image counts are unknown)"
        elif len(known) < len(todo) and plan.rate_entries == 0:
            line += f" (no estimate: nothing of {plan.competition.name} was trained on {plan.device} yet)"
        elif known and plan.est_from:  # nothing of this competition measured yet
            line += (f" (~: nothing of {plan.competition.name} was trained on {plan.device} yet; from {plan.est_from}, "
                     "scaled by FLOPs)")
        elif known:
            line += f" (from {plan.rate_entries} cached member{'s' * (plan.rate_entries > 1)} on {plan.device}, by FLOPs)"
    return line


def _saved_line(plan: Plan) -> Optional[str]:
    """What progressive resizing saves over the ensemble, when a member has stages."""
    staged, at_final = plan.train_flops
    if not any(m.staged for m in plan.members) or staged is None or not at_final:
        return None
    if plan.counts_from is None:
        per = "per training image, the image counts being unknown"
    else:
        per = ("× the training images of every fold model" if plan.folds else
               f"× {'≈' if not plan.data_known else ''}{plan.n_train} training images")
    return (f"progressive resizing: {1 - staged / at_final:.0%} fewer training FLOPs, {_flop(staged)} instead of "
            f"{_flop(at_final)} with every epoch at each member's final size (forward FLOPs × epochs, frozen "
            f"epochs included, {per})")


def _decoded_line(plan: Plan) -> Optional[str]:
    if not plan.decoded:
        return None
    same_hw = {c.hw for c in plan.decoded if sum(d.hw == c.hw for d in plan.decoded) > 1}

    def name(c: DecodedCopy) -> str:
        text = f"{c.hw[0]}x{c.hw[1]}"
        if c.hw in same_hw:
            text += f" (from {'the max_size ' + str(c.prepare['max_size']) + ' copy' if c.prepare else 'the originals'})"
        return text

    where = f"cache/decoded/{plan.competition.name}/"
    if plan.decoded_total is None:
        return (f"decoded copies (decode: true): {len(plan.decoded)}, at {', '.join(map(name, plan.decoded))}, in "
                f"{where}; their size is unknown without the image counts")
    n = plan.n_train + plan.n_valid + plan.n_test
    source = "" if plan.data_known else " (by expected:)"
    sizes = ", ".join(f"{name(c)} {_bytes(c.bytes)}" for c in plan.decoded)
    return (f"decoded copies (decode: true) of the {n} training and test images{source}, one per pre-size shared by "
            f"its members: {sizes}; {_bytes(plan.decoded_total)} on disk in {where}; training reads one at a time "
            f"as a memmap through the page cache: up to {_bytes(plan.decoded_ram)} of RAM (the largest copy)")


def _unknown_line(plan: Plan) -> Optional[str]:
    """One line: what is not known without the data, and the command that fixes it."""
    if plan.data_known:
        return None
    comp = plan.competition
    yaml_file = f"competitions/{comp.name}.yaml"
    missing = ["whether each member is cached (cache keys hash the data)"]
    if plan.classes_from == "placeholder":
        missing.append(f"the class count (params and FLOPs counted with a {PLACEHOLDER_CLASSES}-class head: lower "
                       "bounds, marked ≥)")
    if plan.counts_from is None:
        missing.append("the image counts (no time estimate, no decoded-copy size)")
    given = [what for what, src in (("classes", plan.classes_from), ("image counts", plan.counts_from))
             if src == "expected"]
    known = f"; {' and '.join(given)} from {yaml_file} expected:" if given else ""
    fix = (f"`ens data {comp.name}` downloads it" if comp.kaggle else
           f"put the competition's files in {plan.data_folder} (or set data_dir)")
    if plan.classes_from == "placeholder" or plan.counts_from is None:
        fix += (f", or copy expected: {{classes: N, train_images: N, test_images: N}} from the competition's page "
                f"into {yaml_file}")
    return f"not known before the data is downloaded ({plan.data_folder} is missing): {', '.join(missing)}{known}. {fix}"


def render(plan: Plan, console) -> None:
    """The plan as a rich table and its lines: members, FLOPs saved, decoded copies, what is not known."""
    from rich.markup import escape
    from rich.table import Table

    staged = any(m.staged for m in plan.members)
    recipe = any(m.recipe for m in plan.members)
    table = Table(title=_title(plan))
    columns = ["member", "arch", "stages", *(["recipe"] if recipe else []), "batch", "params", "FLOPs/img",
               *(["FLOPs saved"] if staged else []), "status", "est. time"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("member", "arch", "status", "stages", "recipe") else "right",
                         no_wrap=col in ("arch",))
    lower = "≥" if plan.classes_from == "placeholder" else ""
    for m in plan.members:
        stages = " → ".join(f"{_text(s)}×{e}" for s, e in m.stages)
        if m.frozen_epochs:
            stages = f"frozen×{m.frozen_epochs}, " + stages
        batch = str(m.effective_batch)
        if m.memory is not None:
            batch = f"{m.effective_batch} = {m.memory.describe()}" if m.memory.accumulation_steps > 1 else batch
        elif m.problem and m.device == "cuda":
            batch += " [red](does not fit)[/]"
        flops = " → ".join(lower + _si(m.flops[_text(s)]) if m.flops[_text(s)] is not None else "[red]fails[/]"
                           for s in dict.fromkeys(s for s, _ in m.stages))
        saved = ([f"{m.saved:.0%}" if m.staged and m.saved is not None else ""] if staged else [])
        table.add_row(m.name, m.arch, stages, *([m.recipe or "—"] if recipe else []), batch, lower + _si(m.params),
                      flops, *saved, _status(m), _time(m))
    console.print(table)
    if plan.folds:
        console.print(_fold_table(plan))
    for m in plan.members:
        if m.problem:
            console.print(f"[red]problem:[/] {escape(m.problem)}", highlight=False, soft_wrap=True)
    console.print(_summary(plan), highlight=False)
    for line in (_saved_line(plan), _decoded_line(plan)):
        if line:
            console.print(escape(line), highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    unknown = _unknown_line(plan)
    if unknown:
        console.print(f"[magenta]{escape(unknown)}[/]", highlight=False, soft_wrap=True)
