"""`build_report`: what the report is made from (`ReportContext`), the glance, the score paragraph and the ablation."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from .. import ensemble as ens_math
from ..ablate import ablate
from ..config import Project
from ..crossval import unit_name
from ..util import spread, unique_suffix
from .context import ReportContext
from .figures import _classes, _curves, _similarity
from .history import _mistakes, _submissions
from .html import (
    CSP,
    CSS,
    MAX_SUBSETS_SHOWN,
    SECTIONS,
    _e,
    _epochs,
    _figure,
    _fmt,
    _png,
    _seconds,
    _section,
    _sizes,
    _table,
)


# --------------------------------------------------------------------------------------------- the report
def build_report(project: Project, spec: str, overrides=(), cached_only: bool = False, dest: Path | None = None,
                 *, probs: str | None = None, progress=None, on_member=lambda outcome: None) -> Path:
    """Write the report of ensemble `spec` (members gathered as `ens ablate` does: trained where missing unless
    `cached_only`) to `dest`, by default `submissions/<competition>/report-<ensemble>.html`; return its path."""
    result = ablate(project, spec, list(overrides), cached_only=cached_only, probs=probs, progress=progress,
                    on_member=on_member)
    g = result.gathered
    dest = Path(dest) if dest else project.submissions / g.competition.name / report_name(g, overrides)

    ctx = ReportContext(project, result)
    titles = dict(SECTIONS, mistakes="Most confidently wrong out-of-fold images") if ctx.cv else SECTIONS
    parts = {"glance": _glance, "curves": _curves, "classes": _classes, "ablation": _ablation,
             "similarity": _similarity, "submissions": _submissions, "mistakes": _mistakes}
    body = [_section(key, titles[key], parts[key](ctx)) for key in SECTIONS]
    comp = g.competition
    title = f"{project.relative(g.path)} on {comp.name}"
    nav = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in titles.items())
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ens report: {_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>ens report: {_e(title)}</h1>"
        f"<p>{_e(g.ensemble.description or comp.title or '')}</p>"
        f"<p>{len(result.outcomes)} members · {_e(ctx.rows)} · {_e(result.probs)} probabilities"
        f" · metric {_e(result.metric)} · written {datetime.now().strftime('%Y-%m-%d %H:%M')}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}{unique_suffix()}")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(dest)
    if g.ensemble.tracking == "mlflow":  # beside the CSV of the tracked run it reports, when there is one
        from ..submission import run_hash
        from ..tracking import latest_run

        tracked = latest_run(project.root, comp.name, run_hash(g.ensemble, comp, g.path.stem))
        if tracked is not None:
            tracked.artifact(dest)
    return dest




def report_name(g, overrides) -> str:
    """`report-<ensemble>.html`; with overrides `report-<ensemble>-<hash8>.html`, the hash `ens run` records for
    the same overrides (`ens submissions` shows it): each run's report kept, none overwritten by another's."""
    from ..submission import run_hash

    suffix = f"-{run_hash(g.ensemble, g.competition, g.path.stem)[:8]}" if overrides else ""
    return f"report-{g.path.stem}{suffix}.html"


# --------------------------------------------------------------------------------------------- at a glance
def _glance(ctx: ReportContext) -> str:
    r, kind = ctx.result, ctx.result.probs
    has_test = bool(ctx.comp.solution)
    oof = "OOF " if ctx.cv else ""
    header = ["member", "arch", "size", "epochs", "lr", "weight", "train", "predict",
              f"{'OOF' if ctx.cv else 'valid'} {r.metric}", f"{oof}TTA {r.metric}"] \
        + ([f"per fold {kind} {r.metric}, mean ± std"] if ctx.cv else []) \
        + ([f"test {r.metric}"] if has_test else []) + ["cache key"]
    rows, plain, tta = [], [], []
    total_train = total_predict = 0.0
    for o in r.outcomes:
        meta, m = o.entry.meta, o.member
        p = ens_math.score(r.metric, o.entry.probs("valid", "plain"), ctx.targets)
        t = ens_math.score(r.metric, o.entry.probs("valid", "tta"), ctx.targets)
        plain.append(p)
        tta.append(t)
        timings = meta.get("timings", {})  # a cv member's: summed over its fold models
        total_train += timings.get("train_seconds") or 0
        total_predict += timings.get("predict_seconds") or 0
        dumped = m.model_dump(mode="json")
        row = [m.name, m.arch, _sizes(dumped), _epochs(dumped), f"{m.lr:g}", f"{m.weight:g}",
               _seconds(timings.get("train_seconds")), _seconds(timings.get("predict_seconds")), _fmt(p), _fmt(t)]
        if ctx.cv:
            row.append(spread(o.fold_scores(f"{kind}_{r.metric}")) or "–")
        if has_test:
            row.append(_fmt(ctx.test_score(o.entry.probs("test", kind))))
        rows.append(row + [o.entry.key])
    full_plain, full_tta = ctx.blend("plain").honest, ctx.blend("tta").honest
    test_full = ctx.test_score(ctx.blend(kind).test) if has_test else None
    c = ctx.combine
    name = "weighted mean" if c.method == "mean" else _blend_name(c) + (" (nested CV)" if c.learned else "")
    rows.append(["ensemble", name, "", "", "", "", _seconds(total_train), _seconds(total_predict),
                 _fmt(full_plain), _fmt(full_tta)]
                + ([spread(ctx.blend(kind).per_fold)] if ctx.cv else [])
                + ([_fmt(test_full)] if has_test else []) + [""])
    out = [_score_paragraph(ctx, test_full), _table(header, rows, left=3, classes=[""] * (len(rows) - 1) + ["total"])]
    if ctx.g.incomplete:  # cv, --cached-only: a member is blended only with every fold model
        shown = "; ".join(f"{m} ({', '.join(map(unit_name, folds))})" for m, folds in ctx.g.incomplete.items())
        out.append(f'<p class="bad">Left out: folds missing (--cached-only): {_e(shown)}</p>')
    uncached = [m.name for m in ctx.g.missing if m.name not in ctx.g.incomplete]
    if uncached:
        out.append(f'<p class="bad">Not cached, left out (--cached-only): {_e(", ".join(uncached))}</p>')

    fig = _figure(9, 0.55 * (len(r.outcomes) + 1) + 1.2)
    ax = fig.add_subplot()
    labels = ctx.names + ["ensemble" + (" (nested CV)" if ctx.combine.learned else "")]
    y = np.arange(len(labels))
    ax.barh(y - 0.2, plain + [full_plain], height=0.4, label="plain", color="#8fb8de")
    ax.barh(y + 0.2, tta + [full_tta], height=0.4, label="TTA", color="#1f6feb")
    for yi, (a, b) in enumerate(zip(plain + [full_plain], tta + [full_tta])):
        ax.text(a, yi - 0.2, f" {a:.4f}", va="center", fontsize=8)
        ax.text(b, yi + 0.2, f" {b:.4f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    _zoom(ax, plain + tta + [full_plain, full_tta], axis="x")
    ax.set_xlabel(f"{ctx.scope} {r.metric}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{ctx.scope} score per member, plain and with test-time augmentation", fontsize=10)
    out.append(_png(fig, f"{ctx.scope} scores plain and TTA"))
    return "".join(out)


def _blend_name(c) -> str:
    return f"{c.method} {c.power:g}" if c.method == "power" else c.method


def _score_paragraph(ctx: ReportContext, test_full: float | None) -> str:
    """The ensemble's score to trust, saying on what it is computed and whether its blend was learned there."""
    r, kind, c = ctx.result, ctx.result.probs, ctx.combine
    b = ctx.blend(kind)
    where = f"out-of-fold (OOF) {_e(r.metric)} over {ctx.n} training images, {ctx.k} folds" if ctx.cv \
        else f"validation {_e(r.metric)}"
    how = "" if c.method == "mean" else f", {_e(_blend_name(c))} blend"
    text = f"<p>The ensemble's {where} ({_e(kind)} probabilities{how}): <b>{b.honest:.4f}</b>"
    on = "" if ctx.cv else f" on {r.n_valid} images"
    if b.learned:
        parts = "the cross-validation folds" if ctx.cv else f"{len(b.per_fold)} parts of the holdout"
        text += (f"{on} by nested cross-validation (each of {parts} scored by the blend learned on the others); "
                 f"in-sample {b.in_sample:.4f}, optimistic: its weights were learned on these very rows")
        if b.weights is not None:
            text += " (learned weights " + ", ".join(f"{_e(n)} {w:.2f}" for n, w in zip(ctx.names, b.weights)) + ")"
    else:
        text += (f" (log loss {r.full_log_loss:.4f})" if c.method == "mean" else "") + on
    text += f"; one image is {1 / ctx.n:.4f}."
    if ctx.cv:
        text += f" Per fold: {spread(b.per_fold)} (" + ", ".join(f"{v:.4f}" for v in b.per_fold) + ")."
        how_test = ctx.g.outcomes[0].entry.meta.get("cv", {}).get("test")
        if how_test:
            text += f" Test predictions: {'the refit model' if how_test == 'refit' else 'the mean of the fold models'}."
    if test_full is not None:
        text += f" Test {_e(r.metric)} on the local answers: <b>{test_full:.4f}</b>."
    return text + "</p>"


def _zoom(ax, values, axis="x", pad=0.15):
    """Limits that show the differences (scores of good members crowd near 1), leaving room for labels."""
    lo, hi = float(np.min(values)), float(np.max(values))
    span = max(hi - lo, 1e-3)
    lims = (max(lo - span * 0.6, 0 if lo >= 0 else lo - span), hi + span * (pad + 0.35))
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*lims)


# --------------------------------------------------------------------------------------------- ablation
def _ablation(ctx: ReportContext) -> str:
    r = ctx.result
    names = ctx.names
    scope = f"Out-of-fold (OOF) {_e(r.metric)} over {ctx.n} training images ({ctx.k} folds)" if ctx.cv \
        else f"Validation {_e(r.metric)}"
    mean = "" if ctx.combine.method == "mean" else \
        f" (here the members' weighted mean, not the ensemble's {_e(ctx.combine.method)} blend)"
    out = [f'<p class="note">{scope} from the cached {_e(r.probs)} probabilities; the full ensemble{mean} scores '
           f"{r.full:.4f}; one image is {1 / r.n_valid:.4f}. Read “changed” (images whose label differs from the "
           "full ensemble's: + now right, − now wrong) before believing a difference.</p>"]

    alone = [row.alone for row in r.members]
    without = [row.without for row in r.members]
    panels = 2 if any(w is not None for w in without) else 1
    fig = _figure(10, 0.5 * len(names) + 1.6)
    axes = np.atleast_1d(fig.subplots(1, panels, sharey=True))
    for ax, values, title, color in zip(axes, (alone, without), ("each member alone", "the ensemble without it"),
                                        ("#8fb8de", "#f0a35e")):
        shown = [np.nan if v is None else v for v in values]
        y = np.arange(len(names))
        ax.barh(y, shown, color=color)
        for yi, v in enumerate(values):
            if v is not None:
                ax.text(v, yi, f" {v:.4f} ({v - r.full:+.4f})", va="center", fontsize=7)
        ax.axvline(r.full, color="#1f2328", ls="--", lw=1, label=f"full ensemble {r.full:.4f}")
        ax.set_yticks(y, names)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{ctx.scope} {r.metric}", fontsize=8)
        _zoom(ax, [v for v in values if v is not None] + [r.full], pad=0.6)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].invert_yaxis()
    out.append(_png(fig, "each member alone and the ensemble without it"))

    def moves(c):
        return "–" if c is None else f"{c[0]} (+{c[1]} −{c[2]})"

    rows = [[row.name, f"{ctx.weights[i]:g}", _fmt(row.alone), f"{row.alone - r.full:+.4f}", moves(row.alone_changed),
             _fmt(row.without), "–" if row.without is None else f"{row.without - r.full:+.4f}",
             moves(row.without_changed)] for i, row in enumerate(r.members)]
    out.append(_table(["member", "weight", "alone", "Δ", "changed", "without it", "Δ", "changed"], rows))

    counts = np.asarray(r.greedy_counts, dtype=float)
    yaml_w = np.asarray(ctx.weights, dtype=float)
    fig = _figure(8, 0.45 * len(names) + 1.6)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y - 0.2, yaml_w / yaml_w.sum(), height=0.4, color="#8fb8de", label="weight in the YAML")
    ax.barh(y + 0.2, counts / max(counts.sum(), 1), height=0.4, color="#1a7f37",
            label=f"greedy selection ({r.greedy_score:.4f})")
    for yi, c in enumerate(counts):
        ax.text(c / max(counts.sum(), 1), yi + 0.2, f" {int(c)} picks", va="center", fontsize=7)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("share of the average", fontsize=8)
    ax.set_title(f"greedy selection with replacement ({r.greedy_rounds} rounds, Caruana et al. 2004): "
                 f"{r.greedy_score:.4f}, log loss {r.greedy_log_loss:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    out.append("<h3>Greedy weights</h3>" + _png(fig, "greedy selection weights"))

    if r.subsets:
        sizes = np.array([len(s[0]) for s in r.subsets])
        scores = np.array([s[1] for s in r.subsets])
        fig = _figure(8, 3)
        ax = fig.add_subplot()
        jitter = (np.random.RandomState(0).rand(len(sizes)) - 0.5) * 0.25
        ax.scatter(sizes + jitter, scores, s=14, alpha=0.7, color="#1f6feb")
        best = r.subsets[0]
        ax.scatter([len(best[0])], [best[1]], s=60, marker="*", color="#cf222e",
                   label="best: " + " + ".join(names[i] for i in best[0]))
        ax.axhline(r.full, color="#1f2328", ls="--", lw=1, label=f"full ensemble {r.full:.4f}")
        ax.set_xticks(np.arange(1, len(names) + 1))
        ax.set_xlabel("members in the subset", fontsize=8)
        ax.set_ylabel(f"{ctx.scope} {r.metric}", fontsize=8)
        ax.set_title(f"every subset ({len(r.subsets)}), members keeping their weights", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        out.append("<h3>Subsets</h3>" + _png(fig, "score of every subset by its size"))
        rows = [[i + 1, " + ".join(names[j] for j in s[0]), _fmt(s[1]), _fmt(s[2])]
                for i, s in enumerate(r.subsets[:MAX_SUBSETS_SHOWN])]
        out.append(_table(["rank", "members", r.metric, "log loss"], rows, left=2))
    return "".join(out)
