"""`ens report`: an ensemble as pictures, in one self-contained HTML file.

Everything comes from what is already on disk — the cached members (their probabilities, `meta.json` history and
timings), the ablation computed from them (`ablate.ablate`, which trains missing members unless `cached_only`), the
submission history and the validation images — and lands in one file beside the submissions, with every chart and
thumbnail embedded as a base64 data URI: no server, no script, no external resource; it opens from disk offline.

Charts are drawn with matplotlib's Agg canvas (no pyplot, no global state); per-class metrics are scikit-learn's.
Both are imported inside the functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import ensemble as ens_math
from . import submission
from .ablate import Ablation, ablate
from .config import Project

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
    body = [
        _section("glance", _glance(ctx)),
        _section("curves", _curves(ctx)),
        _section("classes", _classes(ctx)),
        _section("ablation", _ablation(ctx)),
        _section("similarity", _similarity(ctx)),
        _section("submissions", _submissions(ctx)),
        _section("mistakes", _mistakes(ctx)),
    ]
    comp = g.competition
    title = f"{project.relative(g.path)} on {comp.name}"
    nav = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items())
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ens report: {_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>ens report: {_e(title)}</h1>"
        f"<p>{_e(g.ensemble.description or comp.title or '')}</p>"
        f"<p>{len(result.outcomes)} members · {result.n_valid} validation images · {_e(result.probs)} probabilities"
        f" · metric {_e(result.metric)} · written {datetime.now().strftime('%Y-%m-%d %H:%M')}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(dest)
    return dest


def _section(key: str, content: str) -> str:
    return f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>{content}</section>'


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
        self.full = ens_math.combine(self.valid, self.weights)
        self.higher_better = ens_math.GREATER_IS_BETTER[result.metric]

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
    header = ["member", "arch", "size", "epochs", "lr", "weight", "train", "predict", f"valid {r.metric}",
              f"TTA {r.metric}"] + ([f"test {r.metric}"] if has_test else []) + ["cache key"]
    rows, plain, tta = [], [], []
    total_train = total_predict = 0.0
    for o in r.outcomes:
        meta, m = o.entry.meta, o.member
        p = ens_math.score(r.metric, o.entry.probs("valid", "plain"), ctx.targets)
        t = ens_math.score(r.metric, o.entry.probs("valid", "tta"), ctx.targets)
        plain.append(p)
        tta.append(t)
        timings = meta.get("timings", {})
        total_train += timings.get("train_seconds") or 0
        total_predict += timings.get("predict_seconds") or 0
        dumped = m.model_dump(mode="json")
        row = [m.name, m.arch, _sizes(dumped), _epochs(dumped), f"{m.lr:g}", f"{m.weight:g}",
               _seconds(timings.get("train_seconds")), _seconds(timings.get("predict_seconds")), _fmt(p), _fmt(t)]
        if has_test:
            row.append(_fmt(ctx.test_score(o.entry.probs("test", kind))))
        rows.append(row + [o.entry.key])
    full_plain = ens_math.score(r.metric, ens_math.combine([o.entry.probs("valid", "plain") for o in r.outcomes],
                                                           ctx.weights), ctx.targets)
    full_tta = ens_math.score(r.metric, ens_math.combine([o.entry.probs("valid", "tta") for o in r.outcomes],
                                                         ctx.weights), ctx.targets)
    test_full = ctx.test_score(ens_math.combine([o.entry.probs("test", kind) for o in r.outcomes], ctx.weights)) \
        if has_test else None
    rows.append(["ensemble", "weighted mean", "", "", "", "", _seconds(total_train), _seconds(total_predict),
                 _fmt(full_plain), _fmt(full_tta)] + ([_fmt(test_full)] if has_test else []) + [""])
    out = [f"<p>The ensemble's validation {_e(r.metric)} ({_e(kind)} probabilities): <b>{r.full:.4f}</b> "
           f"(log loss {r.full_log_loss:.4f}) on {r.n_valid} images; one image is {1 / r.n_valid:.4f}."
           + (f" Test {_e(r.metric)} on the local answers: <b>{test_full:.4f}</b>." if test_full is not None else "")
           + "</p>",
           _table(header, rows, left=3, classes=[""] * (len(rows) - 1) + ["total"])]
    if ctx.g.missing:
        out.append(f'<p class="bad">Not cached, left out (--cached-only): '
                   f'{_e(", ".join(m.name for m in ctx.g.missing))}</p>')

    fig = _figure(9, 0.55 * (len(r.outcomes) + 1) + 1.2)
    ax = fig.add_subplot()
    labels = ctx.names + ["ensemble"]
    y = np.arange(len(labels))
    ax.barh(y - 0.2, plain + [full_plain], height=0.4, label="plain", color="#8fb8de")
    ax.barh(y + 0.2, tta + [full_tta], height=0.4, label="TTA", color="#1f6feb")
    for yi, (a, b) in enumerate(zip(plain + [full_plain], tta + [full_tta])):
        ax.text(a, yi - 0.2, f" {a:.4f}", va="center", fontsize=8)
        ax.text(b, yi + 0.2, f" {b:.4f}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    _zoom(ax, plain + tta + [full_plain, full_tta], axis="x")
    ax.set_xlabel(f"validation {r.metric}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("validation score per member, plain and with test-time augmentation", fontsize=10)
    out.append(_png(fig, "validation scores plain and TTA"))
    return "".join(out)


def _zoom(ax, values, axis="x", pad=0.15):
    """Limits that show the differences (scores of good members crowd near 1), leaving room for labels."""
    lo, hi = float(np.min(values)), float(np.max(values))
    span = max(hi - lo, 1e-3)
    lims = (max(lo - span * 0.6, 0 if lo >= 0 else lo - span), hi + span * (pad + 0.35))
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*lims)


# --------------------------------------------------------------------------------------------- training curves
def _curves(ctx: _Context) -> str:
    out = ['<p class="note">Per epoch, as fastai recorded it while training; dashed lines mark a new phase '
           '(frozen → unfrozen) or image size.</p><div class="grid">']
    for o in ctx.result.outcomes:
        history = o.entry.meta.get("history") or []
        out.append(f'<div class="card"><h3>{_e(o.member.name)} <span class="note">{_e(o.member.arch)}</span></h3>')
        if not history:
            out.append('<p class="note">no per-epoch history in this cache entry</p></div>')
            continue
        x = np.arange(1, len(history) + 1)
        fixed = {"phase", "epoch", "size", "train_loss", "valid_loss"}
        metrics = [k for k in history[0] if k not in fixed]
        fig = _figure(5.6, 2.6)
        loss_ax, metric_ax = fig.subplots(1, 2)
        for key, color in (("train_loss", "#1f6feb"), ("valid_loss", "#cf222e")):
            ys = [h.get(key) for h in history]
            if any(v is not None for v in ys):
                loss_ax.plot(x, [np.nan if v is None else v for v in ys], marker="o", ms=3, label=key, color=color)
        loss_ax.set_title("loss", fontsize=9)
        loss_ax.legend(fontsize=7)
        for key in metrics:
            ys = [h.get(key) for h in history]
            metric_ax.plot(x, [np.nan if v is None else v for v in ys], marker="o", ms=3, label=key)
        metric_ax.set_title("validation metric" + ("s" if len(metrics) > 1 else ""), fontsize=9)
        if metrics:
            metric_ax.legend(fontsize=7)
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
        out.append(_png(fig, f"training curves of {o.member.name}"))
        last = history[-1]
        out.append(f'<p class="note">{len(history)} epochs; last: '
                   + ", ".join(f"{k} {_fmt(last.get(k))}" for k in ["train_loss", "valid_loss", *metrics]) + "</p></div>")
    return "".join(out) + "</div>"


# --------------------------------------------------------------------------------------------- per class
def _classes(ctx: _Context) -> str:
    from . import ensemble

    models = [("ensemble", ctx.full)] + list(zip(ctx.names, ctx.valid))
    out = [f'<p class="note">On the {ctx.result.n_valid} validation images ({_e(ctx.result.probs)} probabilities); '
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
    out = [f'<p class="note">Validation {_e(r.metric)} from the cached {_e(r.probs)} probabilities; the full '
           f"ensemble scores {r.full:.4f}; one image is {1 / r.n_valid:.4f}. Read “changed” (images whose label "
           "differs from the full ensemble's: + now right, − now wrong) before believing a difference.</p>"]

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
        ax.set_xlabel(f"validation {r.metric}", fontsize=8)
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
        ax.set_ylabel(f"validation {r.metric}", fontsize=8)
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
    out = ['<p class="note">Pearson correlation of the members\' per-image errors on the validation set: near 1, '
           "two members fail on the same images and averaging them adds little.</p>",
           _png(fig, "error correlation heatmap")]
    # how often pairs disagree on the label: a second, plainer view of the same question
    preds = np.stack([p.argmax(1) for p in ctx.valid])
    disagree = (preds[:, None, :] != preds[None, :, :]).mean(2)
    rows = [[names[i]] + [f"{disagree[i, j]:.3f}" for j in range(n)] for i in range(n)]
    out.append("<h3>Share of validation images on which two members predict different labels</h3>"
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
    if not len(wrong):
        return '<p class="good">The ensemble gets every validation image right.</p>'
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:MAX_MISTAKES]
    ids = [str(i) for i in ctx.g.outcomes[0].entry.arrays["valid_ids"]]
    root = ctx.g.data.root
    out = [f'<p class="note">{len(wrong)} of {len(pred)} validation images are wrong; the {len(order)} the ensemble '
           "was surest of, with its probability for the predicted and the true class, and each member's guess.</p>"
           '<div class="gallery">']
    for i in order:
        t, p = int(ctx.targets[i]), int(pred[i])
        guesses = ", ".join(f"{n}: {_e(ctx.vocab[int(v[i].argmax())])}" for n, v in zip(ctx.names, ctx.valid))
        out.append(f'<figure title="{_e(ids[i])}">{_thumbnail(root / ids[i], ids[i])}<figcaption>'
                   f'true <span class="good">{_e(ctx.vocab[t])}</span> ({ctx.full[i, t]:.2f}) · predicted '
                   f'<span class="bad">{_e(ctx.vocab[p])}</span> ({confidence[i]:.2f})'
                   f'<br><span class="note">{_e(Path(ids[i]).name)}<br>{guesses}</span></figcaption></figure>')
    return "".join(out) + "</div>"
