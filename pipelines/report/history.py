"""The report's record sections: the submission history and the validation images most confidently wrong."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import submission
from .context import ReportContext
from .html import MAX_MISTAKES, _e, _figure, _float, _fmt, _png, _table


def _submissions(ctx: ReportContext) -> str:
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
        from datetime import timedelta

        import matplotlib.dates as mdates

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


def _mistakes(ctx: ReportContext) -> str:
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
