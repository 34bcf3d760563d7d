"""Which validation predicts the test score better: the holdout, or out-of-fold probabilities with nested CV?

The same members (ensembles/digits/final.yaml's four) as a holdout ensemble (validated on the fixed 20 %) and as
a 5-fold cross-validated one (ensembles/digits/cv.yaml): for each member and each `combine:` method, the
validation score, the honest estimate (nested cross-validation for learned blends) and the score on the digits'
held-out test answers. Trains what is not cached (about 5 minutes for the 20 fold models on a 2-core CPU).

    python benchmarks/cv_honesty.py [--write docs/cv-honesty.md]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import ensemble  # noqa: E402
from pipelines.config import COMBINE_METHODS, Combine, Project  # noqa: E402
from pipelines.run import gather_members  # noqa: E402


def test_targets(g) -> np.ndarray:
    comp = g.competition
    with open(g.data.root / comp.solution, newline="") as f:
        answers = {row[comp.id_column]: row[comp.target_column] for row in csv.DictReader(f)}
    return np.array([g.data.vocab.index(answers[i]) for i in g.data.test_ids])


def rows_of(g, label: str) -> list[dict]:
    metric, kind = g.competition.metric, g.ensemble.probs
    y_test = test_targets(g)
    targets = g.outcomes[0].entry.arrays["valid_targets"]
    valid = [o.entry.probs("valid", kind) for o in g.outcomes]
    test = [o.entry.probs("test", kind) for o in g.outcomes]
    out = []
    for o, v, t in zip(g.outcomes, valid, test):
        s = ensemble.score(metric, v, targets)
        out.append(dict(ensemble=label, what=f"member {o.member.name}", valid=s, honest=s,
                        test=ensemble.score(metric, t, y_test)))
    folds = g.blend_folds()
    for method in COMBINE_METHODS:
        b = ensemble.blend(Combine(method=method), valid, test, targets, [o.member.weight for o in g.outcomes],
                           folds, metric)
        out.append(dict(ensemble=label, what=f"blend {method}" + (" (learned)" if b.learned else ""),
                        valid=b.in_sample, honest=b.honest, test=ensemble.score(metric, b.test, y_test)))
    return out


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    project = Project(REPO)
    rows = []
    for spec, label in (("digits/final.yaml", "holdout"), ("digits/cv.yaml", "5-fold cv")):
        g = gather_members(project, spec)
        rows += rows_of(g, label)
        n = len(g.outcomes[0].entry.arrays["valid_targets"])
        print(f"{label}: scored on {n} {'holdout' if label == 'holdout' else 'out-of-fold'} images", flush=True)
    lines = ["| ensemble | member or blend | validation | honest estimate | test (local answers) | test − estimate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ensemble']} | {r['what']} | {r['valid']:.4f} | {r['honest']:.4f} | {r['test']:.4f} | "
                     f"{r['test'] - r['honest']:+.4f} |")
    for label in ("holdout", "5-fold cv"):
        errors = [abs(r["test"] - r["honest"]) for r in rows if r["ensemble"] == label]
        optimistic = [abs(r["test"] - r["valid"]) for r in rows if r["ensemble"] == label]
        lines.append(f"\n{label}: mean |test − honest estimate| {np.mean(errors):.4f} over {len(errors)} rows "
                     f"(|test − in-sample validation| {np.mean(optimistic):.4f})")
    text = "\n".join(lines)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    return lines


if __name__ == "__main__":
    main()
