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

Modules: `html` (the page's pieces), `build` (the report and its first sections), `figures` (curves, classes,
similarity), `history` (submissions, mistakes).
"""

from .html import SECTIONS  # noqa: F401
from .build import build_report  # noqa: F401
