"""`ens ablate` on real cached digits members, checked against an independent computation here."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import copy_project, ens
from pipelines.ablate import ablate
from pipelines.config import Project, load_ensemble
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow  # needs the trained tiny ensemble


def _acc(p, y):
    return float((p.argmax(1) == y).mean())


def test_ablation_numbers_match_an_independent_computation(tiny_run, tmp_path):
    root = copy_project(tiny_run[0], tmp_path / "p")
    entries = {o.member.name: o.entry for o in tiny_run[1].members}
    y = entries["convnext"].arrays["valid_targets"]
    p = {n: e.arrays["valid_tta"].astype("float64") for n, e in entries.items()}
    w = {"convnext": 1.0, "effnet": 1.0, "resnet": 3.0}
    r = ablate(Project(root), "digits/tiny.yaml", ["members.resnet.weight=3"])
    assert r.names == ["convnext", "effnet", "resnet"] and r.n_valid == len(y)
    full = sum(w[n] * p[n] for n in p) / sum(w.values())
    assert r.full == pytest.approx(_acc(full, y))
    for row in r.members:
        assert row.alone == pytest.approx(_acc(p[row.name], y))
        rest = [n for n in p if n != row.name]
        without = sum(w[n] * p[n] for n in rest) / sum(w[n] for n in rest)
        assert row.without == pytest.approx(_acc(without, y))
        moved = without.argmax(1) != full.argmax(1)
        assert row.without_changed == (moved.sum(), (moved & (without.argmax(1) == y)).sum(),
                                       (moved & (full.argmax(1) == y)).sum())
        # a score difference is exactly the net count of changed images
        assert row.without - r.full == pytest.approx((row.without_changed[1] - row.without_changed[2]) / len(y))
    expected = {}
    for k in range(1, 4):
        for combo in itertools.combinations(p, k):
            mixed = sum(w[n] * p[n] for n in combo) / sum(w[n] for n in combo)
            expected[combo] = _acc(mixed, y)
    got = {tuple(r.names[i] for i in idx): s for idx, s, _ in r.subsets}
    assert got.keys() == expected.keys()
    for combo, s in expected.items():
        assert got[combo] == pytest.approx(s)
    scores = [s for _, s, _ in r.subsets]
    assert scores == sorted(scores, reverse=True)
    # greedy selection never scores below the best single member on validation
    assert r.greedy_score >= max(row.alone for row in r.members)
    assert r.greedy_counts.sum() >= 1 and np.allclose(np.diag(r.correlation), 1)


def test_write_and_submit_the_selection(tiny_run, tmp_path):
    root = copy_project(tiny_run[0], tmp_path / "p")
    out = ens("ablate", "digits/tiny.yaml", "--top", "3", "--write", "ensembles/digits/picked.yaml", "--submit",
              cwd=root)
    assert out.returncode == 0, out.stderr
    for heading in ("full ensemble", "best subsets", "greedy selection", "error correlation", "changed"):
        assert heading in out.stdout
    picked = yaml.safe_load((root / "ensembles/digits/picked.yaml").read_text())
    _, e, _ = load_ensemble(Project(root), "digits/picked.yaml")
    r = ablate(Project(root), "digits/tiny.yaml")
    # greedy's counts are learned on the validation rows: written as `combine: greedy` over every member, so the
    # score recorded, here and by any later run, is its nested-CV one, not the in-sample score of the counts
    # (with the ensemble's rounds, combine.rounds' default 100: the bare method name)
    assert picked["combine"] == "greedy" and e.combine.rounds == r.greedy_rounds == 100
    assert [m.name for m in e.members] == r.names
    assert f"{r.greedy_honest:.4f} (nested cross-validation)" in (root / "ensembles/digits/picked.yaml").read_text()
    assert picked["defaults"]["size"] == 32  # the rest of the source survives
    rerun = run_ensemble(Project(root), "digits/picked.yaml")
    assert rerun.trained == [] and rerun.valid_score == pytest.approx(r.greedy_honest)
    assert "submission: submissions/digits/" in out.stdout and "-greedy.csv" in out.stdout


def test_cached_only_leaves_out_what_is_missing_and_imports_no_torch(tiny_run, tmp_path):
    root = copy_project(tiny_run[0], tmp_path / "p")
    text = (root / "ensembles/digits/tiny.yaml").read_text() + "  - {name: fresh, arch: test_resnet, lr: 0.001}\n"
    (root / "ensembles/digits/more.yaml").write_text(text)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipelines.cli", "ablate", "digits/more.yaml",
                          "--cached-only"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not cached, left out: fresh" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    # scikit-learn is allowed: the combine methods' table fits a stacking logistic regression
    assert not {"torch", "fastai", "timm", "torchvision"} & imported
    assert not list((root / "cache/digits").glob(".tmp-*")) and len(list((root / "cache/digits").glob("*/meta.json"))) == 3


def test_ens_ablate_imports_no_heavy_library(tiny_run, tmp_path):
    """`ens ablate` reads the cache: every table (bootstrap, McNemar, subsets, every combine method with stacking
    and rank averaging) without torch, scikit-learn or scipy.stats, whose imports cost more than the ablation."""
    root = copy_project(tiny_run[0], tmp_path / "p")
    code = ("import sys\nfrom pipelines.cli import main\nsys.argv = ['ens', 'ablate', 'digits/tiny.yaml']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'fastai', 'timm', 'sklearn', 'scipy.stats', 'matplotlib', 'ray')\n"
            "print('HEAVY', sorted(h for h in heavy if h in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert "combine" in out.stdout.lower(), out.stdout + out.stderr  # the methods table was computed
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]


def test_the_combine_methods_table_is_memoised_by_what_it_depends_on(tiny_run, tmp_path, monkeypatch):
    """Its nested CV (stacking's fits above all) is most of what `ens ablate` costs: a second ablation of the same
    probabilities reads the rows back; other weights (or members, folds, settings) compute them again."""
    from pipelines import ensemble

    root = copy_project(tiny_run[0], tmp_path / "p")
    first = ablate(Project(root), "digits/tiny.yaml")

    def refuse(*a, **k):
        raise AssertionError("stacking fitted again")

    monkeypatch.setattr(ensemble, "stacking_fit", refuse)
    again = ablate(Project(root), "digits/tiny.yaml")
    assert [(m.method, m.honest, m.in_sample) for m in again.methods] == \
        [(m.method, m.honest, m.in_sample) for m in first.methods]
    with pytest.raises(AssertionError, match="stacking fitted again"):
        ablate(Project(root), "digits/tiny.yaml", ["members.resnet.weight=3"])
