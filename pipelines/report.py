"""`ens report`: an ensemble as pictures, in one self-contained HTML file.

Everything comes from what is already on disk — the cached members (their probabilities, `meta.json` history and
timings), the ablation computed from them (`ablate.ablate`, which trains missing members unless `cached_only`), the
submission history and the validation images — and lands in one file beside the submissions, with every chart and
thumbnail embedded as a base64 data URI: no server, no script, no external resource; it opens from disk offline.

A cross-validated ensemble (`validation: cv`) is reported on its out-of-fold (OOF) rows — every training image,
predicted by the fold model that did not see it — with one training curve per fold model, and every ensemble is
scored as its `combine:` blends it (learned blends by nested cross-validation, as `ens run` records them).

Charts are drawn with matplotlib's Agg canvas (no pyplot, no global state); per-class metrics are scikit-learn's.
Both are imported inside the functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import ensemble as ens_math
from . import submission
from .ablate import Ablation, ablate
from .config import Project
from .crossval import unit_name
from .util import spread, unique_suffix

SECTIONS = {  # id → title, in page order (tests find the sections by these ids)
    "glance": "At a glance",
    "curves": "Training curves",
    "classes": "Confusion matrices and per-class scores",
    "ablation": "Ablation",
    "similarity": "Member similarity",
    "submissions": "Submission history",
    "mistakes": "Most confidently wrong validation images",
}
# nothing may load from anywhere but the page itself, and nothing may run: the report opens offline, and a label or
# file name that slipped through escaping could not execute (a test loads the page and counts console errors)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_MISTAKES = 24
MAX_SUBSETS_SHOWN = 10
ANNOTATE_CELLS_UP_TO = 20  # classes; above this a confusion matrix is drawn without numbers

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
header{background:#24292f;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#d0d7de;font-size:14px}
nav{position:sticky;top:0;background:#f6f8fa;border-bottom:1px solid #d0d7de;padding:8px 32px;z-index:1}
nav a{margin-right:16px;color:#0969da;text-decoration:none;font-size:14px}
main{max-width:1240px;padding:8px 32px 48px}
section{margin-top:28px}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{margin:14px 0 6px;font-size:16px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th{background:#f6f8fa}
td.l,th.l{text-align:left}
tr.total td{font-weight:600;background:#fff8c5}
img.chart{max-width:100%;height:auto;display:block;margin:6px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:16px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:6px;width:150px;text-align:center;font-size:12px}
figure img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#000}
.bad{color:#cf222e;font-weight:600}
.good{color:#1a7f37;font-weight:600}
.note{color:#57606a;font-size:13px}
"""


# --------------------------------------------------------------------------------------------- small helpers
def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return _e(value)


def _seconds(value) -> str:
    return "–" if value is None else f"{float(value):.1f}s"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list], left: int = 1, classes: list[str] | None = None) -> str:
    """An HTML table; the first `left` columns are left-aligned; cells are escaped unless wrapped in _Raw."""
    def cell(tag, i, v):
        return f'<{tag}{" class=l" if i < left else ""}>{v if isinstance(v, _Raw) else _e(v)}</{tag}>'

    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"]
    for n, row in enumerate(rows):
        cls = f' class="{classes[n]}"' if classes and classes[n] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


class _Raw(str):
    """Already HTML."""


def _sizes(member: dict) -> str:
    stages = member.get("stages") or [[member.get("size"), member.get("epochs")]]
    return " → ".join(f"{'×'.join(map(str, s)) if isinstance(s, list) else s}" for s, _ in stages)


def _epochs(member: dict) -> int:
    stages = member.get("stages") or [[member.get("size"), member.get("epochs")]]
    return sum(int(e or 0) for _, e in stages)


# --------------------------------------------------------------------------------------------- the report
def build_report(project: Project, spec: str, overrides=(), cached_only: bool = False, dest: Path | None = None,
                 *, probs: str | None = None, progress=None, on_member=lambda outcome: None) -> Path:
    """Write the report of ensemble `spec` (members gathered as `ens ablate` does: trained where missing unless
    `cached_only`) to `dest`, by default `submissions/<competition>/report-<ensemble>.html`; return its path."""
    result = ablate(project, spec, list(overrides), cached_only=cached_only, probs=probs, progress=progress,
                    on_member=on_member)
    g = result.gathered
    dest = Path(dest) if dest else project.submissions / g.competition.name / f"report-{g.path.stem}.html"

    ctx = _Context(project, result)
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
    return dest


def _section(key: str, title: str, content: str) -> str:
    return f'<section id="{key}"><h2>{_e(title)}</h2>{content}</section>'


class _Context:
    """What every section reads: the ablation, the members' validation probabilities, the ensemble's blend."""

    def __init__(self, project: Project, result: Ablation):
        self.project, self.result = project, result
        self.g = result.gathered
        self.comp = self.g.competition
        self.names = result.names
        self.vocab = self.g.outcomes[0].entry.vocab
        self.targets = self.g.outcomes[0].entry.arrays["valid_targets"].astype(int)
        self.valid = [o.entry.probs("valid", result.probs).astype("float64") for o in result.outcomes]
        self.weights = [o.member.weight for o in result.outcomes]
        self.higher_better = ens_math.GREATER_IS_BETTER[result.metric]
        self.cv = self.g.cv
        self.n = len(self.targets)
        self.combine = self.g.ensemble.combine
        self.k = len(np.unique(self.g.fold_ids)) if self.cv else None  # the cross-validation's folds
        self._blends = {}
        # the ensemble's validation rows as its honest score sees them: a learned blend's nested-CV predictions
        # (each row blended by weights learned without it), not the in-sample ones that flatter it
        self.full = self.blend(result.probs).held_out

    @property
    def rows(self) -> str:
        """What the scores are computed on: the holdout's validation images, or every training image out of fold."""
        if not self.cv:
            return f"{self.n} validation images"
        return f"out-of-fold (OOF) over {self.n} training images, {self.k} folds"

    @property
    def scope(self) -> str:
        """The scores' short name, for axes and column headers."""
        return "OOF" if self.cv else "validation"

    def blend(self, kind: str) -> ens_math.Blended:
        """The members' `kind` probabilities blended as the ensemble's `combine:` says, with its honest score
        (nested cross-validation over the blend folds for learned blends), as `ens run` scores it."""
        if kind not in self._blends:
            self._blends[kind] = ens_math.blend(
                self.combine, [x.entry.probs("valid", kind) for x in self.result.outcomes],
                [x.entry.probs("test", kind) for x in self.result.outcomes], self.targets, self.weights,
                self.g.blend_folds(), self.result.metric)
        return self._blends[kind]

    def test_score(self, test_probs: np.ndarray) -> float | None:
        """The metric on the local answers (competitions scored here), as `ens run` scores members."""
        if not self.comp.solution:
            return None
        solution = self.g.data.root / self.comp.solution
        if not solution.is_file():
            return None
        entry = self.g.outcomes[0].entry
        ids = [str(i) for i in entry.arrays["test_ids"]]
        values = submission.submission_values(self.comp, test_probs, self.vocab)  # labels, or probabilities
        return submission.score_values(ids, values, solution, self.comp)


# --------------------------------------------------------------------------------------------- at a glance
def _glance(ctx: _Context) -> str:
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


def _score_paragraph(ctx: _Context, test_full: float | None) -> str:
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


# --------------------------------------------------------------------------------------------- training curves
FOLD_COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#0a7c86", "#bf3989", "#6e7781"]
REFIT_COLOR = "#1f2328"


def _runs(o) -> list[tuple[str | None, list[dict]]]:
    """(label, per-epoch history) of each model behind a member: its one model (label None), or in cv each fold
    model and the refit (a joined entry keeps their histories in `units`, its own is empty)."""
    units = o.entry.meta.get("units")
    if not units:
        return [(None, o.entry.meta.get("history") or [])]
    return [(unit_name(u["fold"]), u.get("history") or []) for u in units]


def _curves(ctx: _Context) -> str:
    what = "one line per fold model (the refit's train loss in black); dashed vertical" if ctx.cv else "dashed"
    out = [f'<p class="note">Per epoch, as fastai recorded it while training; {what} lines mark a new phase '
           '(frozen → unfrozen) or image size.</p><div class="grid">']
    for o in ctx.result.outcomes:
        runs = [(label, h) for label, h in _runs(o) if h]
        out.append(f'<div class="card"><h3>{_e(o.member.name)} <span class="note">{_e(o.member.arch)}</span></h3>')
        if not runs:
            out.append('<p class="note">no per-epoch history in this cache entry</p></div>')
            continue
        fig, metrics = _curves_figure(runs)
        labels = [label for label, _ in runs if label]
        alt = f"training curves of {o.member.name}" + (f", one line per fold model: {', '.join(labels)}"
                                                         if labels else "")
        out.append(_png(fig, alt) + _curves_note(runs, metrics) + "</div>")
    return "".join(out) + "</div>"


def _curves_figure(runs: list[tuple[str | None, list[dict]]]):
    """Loss and validation metrics per epoch: one model's in two colours, or each fold model's in its own
    (train solid, valid dashed). Returns (figure, metric names)."""
    fixed = {"phase", "epoch", "size", "train_loss", "valid_loss"}
    metrics = list(dict.fromkeys(k for _, h in runs for k in h[0] if k not in fixed))
    fig = _figure(5.6, 2.6)
    loss_ax, metric_ax = fig.subplots(1, 2)
    single = len(runs) == 1 and runs[0][0] is None

    def line(ax, history, key, **style):
        ys = [h.get(key) for h in history]
        if any(v is not None for v in ys):
            ax.plot(np.arange(1, len(ys) + 1), [np.nan if v is None else v for v in ys], marker="o", ms=3, **style)

    for n, (label, history) in enumerate(runs):
        if single:
            line(loss_ax, history, "train_loss", label="train_loss", color="#1f6feb")
            line(loss_ax, history, "valid_loss", label="valid_loss", color="#cf222e")
            for key in metrics:
                line(metric_ax, history, key, label=key)
            continue
        color = REFIT_COLOR if label == "refit" else FOLD_COLORS[n % len(FOLD_COLORS)]
        line(loss_ax, history, "train_loss", label=label, color=color)
        line(loss_ax, history, "valid_loss", color=color, ls="--")
        for i, key in enumerate(metrics):
            line(metric_ax, history, key, color=color, ls=("-", "--", ":", "-.")[i % 4],
                 label=label if len(metrics) == 1 else f"{label} {key}")
    loss_ax.set_title("loss" if single else "loss (train solid, valid dashed)", fontsize=9)
    loss_ax.legend(fontsize=7)
    metric_ax.set_title("validation metric" + ("s" if len(metrics) > 1 else "") + (": " + ", ".join(metrics)
                        if not single and len(metrics) == 1 else ""), fontsize=9)
    if metrics:
        metric_ax.legend(fontsize=7)
    history = max((h for _, h in runs), key=len)
    x = np.arange(1, len(history) + 1)
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(x) < 15:
            ax.set_xticks(x)
        for i in range(1, len(history)):
            if (history[i].get("phase"), history[i].get("size")) != (history[i - 1].get("phase"),
                                                                      history[i - 1].get("size")):
                ax.axvline(i + 0.5, ls="--", color="#888", lw=0.8)
    return fig, metrics


def _curves_note(runs, metrics) -> str:
    def last(history, every=False):  # a refit has no validation loss or metric: left out, not shown as –
        row = history[-1]
        return ", ".join(f"{k} {_fmt(row.get(k))}" for k in ["train_loss", "valid_loss", *metrics]
                         if every or row.get(k) is not None)

    if len(runs) == 1 and runs[0][0] is None:
        history = runs[0][1]
        return f'<p class="note">{len(history)} epochs; last: {last(history, every=True)}</p>'
    epochs = sorted({len(h) for _, h in runs})
    return (f'<p class="note">{len(runs)} models, {"/".join(map(str, epochs))} epochs each; last epoch: '
            + "; ".join(f"{_e(label)}: {last(h)}" for label, h in runs) + "</p>")


# --------------------------------------------------------------------------------------------- per class
def _classes(ctx: _Context) -> str:
    from . import ensemble

    name = "ensemble" + (f" ({ctx.combine.method}, nested CV)" if ctx.combine.learned else "")
    models = [(name, ctx.full)] + list(zip(ctx.names, ctx.valid))
    on = f"the out-of-fold (OOF) predictions of {ctx.n} training images ({ctx.k} folds)" if ctx.cv \
        else f"the {ctx.result.n_valid} validation images"
    out = [f'<p class="note">On {_e(on)} ({_e(ctx.result.probs)} probabilities); '
           "rows are the true class, columns the predicted one.</p>"]
    blocks = []
    for name, p in models:
        scores = ensemble.per_class(p, ctx.targets, ctx.vocab)  # what the cache and .validation.json keep
        cm = np.array(scores["confusion"])
        prec, rec, f1, support = (np.array(scores[k]) for k in ("precision", "recall", "f1", "support"))
        acc = ensemble.accuracy(p, ctx.targets)
        blocks.append(f'<div class="card"><h3>{_e(name)} <span class="note">accuracy {acc:.4f}, macro F1 '
                      f'{f1.mean():.4f}</span></h3>')
        blocks.append(_png(_confusion_figure(cm, ctx.vocab, name), f"confusion matrix of {name}"))
        rows = [[c, _fmt(a, 3), _fmt(b, 3), _fmt(f, 3), int(s)] for c, a, b, f, s in zip(ctx.vocab, prec, rec, f1, support)]
        rows.append(["macro", _fmt(prec.mean(), 3), _fmt(rec.mean(), 3), _fmt(f1.mean(), 3), int(support.sum())])
        table = _table(["class", "precision", "recall", "F1", "support"], rows,
                       classes=[""] * (len(rows) - 1) + ["total"])
        if len(ctx.vocab) > 20:
            table = f"<details><summary>per-class table ({len(ctx.vocab)} classes)</summary>{table}</details>"
        blocks.append(table + "</div>")
    out.append('<div class="grid">' + "".join(blocks) + "</div>")
    return "".join(out)


def _confusion_figure(cm: np.ndarray, vocab: list[str], name: str):
    n = len(vocab)
    side = min(max(3.2, 0.3 * n + 1.6), 12)
    fig = _figure(side + 0.6, side)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ticks = np.arange(n)
    fontsize = 8 if n <= 20 else 5
    ax.set_xticks(ticks, vocab, rotation=90 if max(map(len, vocab)) > 3 else 0, fontsize=fontsize)
    ax.set_yticks(ticks, vocab, fontsize=fontsize)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(name, fontsize=9)
    if n <= ANNOTATE_CELLS_UP_TO:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > top / 2 else ("#cf222e" if i != j else "black"))
    return fig


# --------------------------------------------------------------------------------------------- ablation
def _ablation(ctx: _Context) -> str:
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


# --------------------------------------------------------------------------------------------- similarity
def _similarity(ctx: _Context) -> str:
    corr = np.asarray(ctx.result.correlation)
    names = ctx.names
    n = len(names)
    side = max(3.5, 0.7 * n + 2)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="correlation of errors")
    ax.set_xticks(np.arange(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(corr[i, j]) > 0.6 else "black")
    ax.set_title("error correlation (of 1 − p(true class))", fontsize=9)
    on = "out-of-fold rows (every training image)" if ctx.cv else "validation set"
    out = [f'<p class="note">Pearson correlation of the members\' per-image errors on the {on}: near 1, '
           "two members fail on the same images and averaging them adds little.</p>",
           _png(fig, "error correlation heatmap")]
    # how often pairs disagree on the label: a second, plainer view of the same question
    preds = np.stack([p.argmax(1) for p in ctx.valid])
    disagree = (preds[:, None, :] != preds[None, :, :]).mean(2)
    rows = [[names[i]] + [f"{disagree[i, j]:.3f}" for j in range(n)] for i in range(n)]
    images = "training images (out of fold)" if ctx.cv else "validation images"
    out.append(f"<h3>Share of {images} on which two members predict different labels</h3>"
               + _table([""] + names, rows))
    return "".join(out)


# --------------------------------------------------------------------------------------------- submissions
def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _submissions(ctx: _Context) -> str:
    history = ctx.project.submissions / ctx.comp.name / "history.csv"
    rows = submission.read_history(history)
    shown = ctx.project.relative(history)
    if not rows:
        return f'<p class="note">No submissions yet ({_e(shown)} is empty or missing); `ens run` writes one.</p>'
    mine = ctx.project.relative(ctx.g.path)
    times, valid, score, own = [], [], [], []
    for row in rows:
        try:
            t = datetime.fromisoformat(row.get("time", ""))
        except ValueError:
            continue
        if t.tzinfo is None:  # ens writes UTC with its offset; a hand-edited row without one is taken as UTC
            t = t.replace(tzinfo=timezone.utc)
        times.append(t)
        valid.append(_float(row.get("valid_score")))
        score.append(_float(row.get("score")))
        own.append(row.get("ensemble") == mine)
    where = "public (Kaggle) or local test score"
    out = [f'<p class="note">{len(rows)} rows of {_e(shown)}; filled markers are this ensemble ({_e(mine)}), hollow '
           f"ones other ensembles. “score” is the {where}.</p>"]
    if times:
        fig = _figure(10, 3.4)
        ax_time, ax_xy = fig.subplots(1, 2, width_ratios=[1.6, 1])
        idx = np.arange(len(times))
        for values, label, color in ((valid, "validation", "#1f6feb"), (score, "public / test", "#cf222e")):
            xs = [i for i in idx if values[i] is not None]
            ax_time.plot([times[i] for i in xs], [values[i] for i in xs], color=color, lw=0.8, alpha=0.5)
            for flag, face in ((True, color), (False, "none")):
                pick = [i for i in xs if own[i] == flag]
                if pick:
                    ax_time.scatter([times[i] for i in pick], [values[i] for i in pick], s=22, edgecolors=color,
                                    facecolors=face, label=f"{label}" + ("" if flag else " (other ensembles)"))
        ax_time.set_title("scores over time", fontsize=9)
        ax_time.set_ylabel(ctx.result.metric, fontsize=8)
        ax_time.legend(fontsize=7)
        ax_time.grid(alpha=0.3)
        ax_time.tick_params(labelsize=7)
        import matplotlib.dates as mdates
        from datetime import timedelta

        if max(times) - min(times) < timedelta(hours=2):  # one submission, or one afternoon's: a readable axis
            middle = min(times) + (max(times) - min(times)) / 2
            ax_time.set_xlim(middle - timedelta(hours=1), middle + timedelta(hours=1))
        locator = mdates.AutoDateLocator(maxticks=6)
        ax_time.xaxis.set_major_locator(locator)
        ax_time.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

        both = [i for i in idx if valid[i] is not None and score[i] is not None]
        if both:
            xs = [valid[i] for i in both]
            ys = [score[i] for i in both]
            for flag, face in ((True, "#8250df"), (False, "none")):
                pick = [k for k, i in enumerate(both) if own[i] == flag]
                if pick:
                    ax_xy.scatter([xs[k] for k in pick], [ys[k] for k in pick], s=26, edgecolors="#8250df",
                                  facecolors=face, label="this ensemble" if flag else "other ensembles")
            lo, hi = min(xs + ys), max(xs + ys)
            pad = max(hi - lo, 1e-3) * 0.1
            ax_xy.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="#888", lw=0.8, label="equal")
            ax_xy.legend(fontsize=7)
        else:
            ax_xy.text(0.5, 0.5, "no scored submission yet", ha="center", va="center", transform=ax_xy.transAxes)
        ax_xy.set_xlabel(f"validation {ctx.result.metric}", fontsize=8)
        ax_xy.set_ylabel("public / test score", fontsize=8)
        ax_xy.set_title("local validation against public / test", fontsize=9)
        ax_xy.grid(alpha=0.3)
        ax_xy.tick_params(labelsize=7)
        out.append(_png(fig, "submission scores over time and validation against public score"))
    table = [[row.get("time", ""), row.get("ensemble", ""), _fmt(row.get("valid_score")), _fmt(row.get("score")),
              row.get("status", ""), row.get("destination", ""), row.get("file", "")] for row in rows[-20:][::-1]]
    out.append(f"<h3>Latest {len(table)} submissions</h3>"
               + _table(["time", "ensemble", "valid", "score", "status", "destination", "file"], table, left=2))
    return "".join(out)


# --------------------------------------------------------------------------------------------- mistakes
def _thumbnail(path: Path, alt: str) -> str:
    """The image as an embedded thumbnail: small images scaled up (pixelated), large ones down; JPEG for photos."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if max(im.size) < 128:
                scale = max(1, 128 // max(im.size))
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            else:
                im.thumbnail((160, 160))
            buf = io.BytesIO()
            photo = path.suffix.lower() in (".jpg", ".jpeg")
            im.save(buf, format="JPEG" if photo else "PNG", **({"quality": 85} if photo else {}))
    except (OSError, ValueError):
        return f'<div class="note">{_e(alt)}: image unreadable</div>'
    mime = "jpeg" if photo else "png"
    return f'<img alt="{_e(alt)}" src="data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _mistakes(ctx: _Context) -> str:
    pred = ctx.full.argmax(1)
    confidence = ctx.full[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != ctx.targets)
    images = "training images (out of fold)" if ctx.cv else "validation images"
    if not len(wrong):
        every = "every training image right out of fold" if ctx.cv else "every validation image right"
        return f'<p class="good">The ensemble gets {every}.</p>'
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:MAX_MISTAKES]
    arrays = ctx.g.outcomes[0].entry.arrays
    ids = [str(i) for i in arrays["valid_ids"]]  # paths under the data root: the training images' in cv
    folds = arrays.get("valid_folds")
    root = ctx.g.data.root
    learned = (f" (its {_e(ctx.combine.method)} blend, each row by weights learned without it)"
               if ctx.combine.learned else "")
    out = [f'<p class="note">{len(wrong)} of {len(pred)} {images} are wrong; the {len(order)} the ensemble{learned} '
           "was surest of, with its probability for the predicted and the true class, and each member's guess"
           + (" (each image predicted by the fold models that did not train on it)" if ctx.cv else "") + ".</p>"
           '<div class="gallery">']
    for i in order:
        t, p = int(ctx.targets[i]), int(pred[i])
        guesses = ", ".join(f"{n}: {_e(ctx.vocab[int(v[i].argmax())])}" for n, v in zip(ctx.names, ctx.valid))
        out.append(f'<figure title="{_e(ids[i])}">{_thumbnail(root / ids[i], ids[i])}<figcaption>'
                   f'true <span class="good">{_e(ctx.vocab[t])}</span> ({ctx.full[i, t]:.2f}) · predicted '
                   f'<span class="bad">{_e(ctx.vocab[p])}</span> ({confidence[i]:.2f})'
                   f'<br><span class="note">{_e(Path(ids[i]).name)}'
                   + (f" · fold {int(folds[i])}" if folds is not None else "")
                   + f'<br>{guesses}</span></figcaption></figure>')
    return "".join(out) + "</div>"
