"""The report's charts: training curves per member (and fold), per-class scores, confusion matrices, member
similarity."""

from __future__ import annotations

import numpy as np

from ..crossval import unit_name
from .context import ReportContext
from .html import ANNOTATE_CELLS_UP_TO, _e, _figure, _fmt, _png, _table

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


def _curves(ctx: ReportContext) -> str:
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
def _classes(ctx: ReportContext) -> str:
    from .. import ensemble

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


# --------------------------------------------------------------------------------------------- similarity
def _similarity(ctx: ReportContext) -> str:
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
