"""The report page's pieces: sections, styles, escaping, numbers, tables and embedded PNG figures."""

from __future__ import annotations

import base64
import html
import io

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


def _section(key: str, title: str, content: str) -> str:
    return f'<section id="{key}"><h2>{_e(title)}</h2>{content}</section>'


# --------------------------------------------------------------------------------------------- submissions
def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
