"""`ens plan ENSEMBLE --on kaggle`: the units a `ens run --on kaggle` would send (not cached, not already in a
running notebook), their keys planned as they resolve on that Kaggle GPU, split into notebooks by estimated time."""

from __future__ import annotations

from ..config import Project


def kaggle_plan(project: Project, spec: str, overrides: list[str], target, hours: float | None = None) -> list[str]:
    """Lines to print: what would be sent, in how many notebooks, with what estimate; nothing is pushed."""
    from ..cache import MemberCache
    from ..crossval import unit_name
    from ..data import load_data
    from ..device import assumed
    from ..remote.runs import Remote, Sent, estimate, measured_rate, plan
    from ..run import _plan_units, check_ensemble
    from ..unit import fold_variants

    path, ens, comp = check_ensemble(project, spec, list(overrides))
    remote = Remote(project, comp, path, list(overrides), target, hours=hours)
    data = load_data(project, comp)
    variants, _ = fold_variants(ens, data, None, project.relative(path))
    planned: list = []
    with assumed(target.gpu.facts):
        _plan_units(project, ens, variants, MemberCache(project.cache, comp.name), False, (), planned, [])
    todo = [u for u in planned if u.entry is None]
    flight = remote.in_flight()
    units = [Sent(u.member.name + ("" if u.fold is None else f" {unit_name(u.fold)}"), u.member, u.fold, u.train,
                  u.key, sum(not v for v in u.data.is_valid)) for u in todo if u.key not in flight]
    rate = measured_rate(project, comp, target.gpu.kind)
    basis = "measured on earlier notebooks" if rate else "a stated estimate, not yet measured"
    rate = rate or target.gpu.seconds_per_image_epoch
    lines = [f"--on kaggle ({target.gpu.kind}, internet {'on' if target.internet else 'off'}): "
             f"{len(planned) - len(todo)} unit(s) cached, {len(todo) - len(units)} in running notebooks, "
             f"{len(units)} to send ({rate:.4f} s per image-epoch at 224 px: {basis})"]
    at_once = f" ({remote.lanes} at once, one per card)" if remote.lanes > 1 else ""
    for i, group in enumerate(plan(units, rate, remote.hours, remote.lanes) if units else []):
        lines.append(f"  notebook {i + 1}: {', '.join(u.label for u in group)}{at_once} — about "
                     f"{estimate(group, rate, remote.lanes) / 60:.0f} min of the {remote.hours:g} h limit")
    return lines
