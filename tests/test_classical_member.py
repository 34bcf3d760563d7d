"""A classical member (`arch: classical:EXTRACTORS/CLASSIFIER`) in an ensemble: trained on the same split from the
member's decoded copy, cached under a key like any member's, blended, ablated, planned; a bad name is one line."""

import numpy as np
import pytest

from conftest import ens, make_project
from pipelines.config import Project

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

MIXED = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 2, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 0}}
members:
  - {name: resnet, arch: test_resnet}
  - {name: traces, arch: "classical:em_traces+color_hist/logistic"}
"""


def test_a_classical_member_is_cached_blended_and_ablated(tmp_path, digits_data):
    from pipelines.ablate import ablate
    from pipelines.classical import fit_predict
    from pipelines.data import load_data
    from pipelines.data.decoded import decoded_images
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"mixed": MIXED})
    project = Project(root)
    first = run_ensemble(project, "digits/mixed.yaml", submit=False)
    traces = first.members[1]
    assert traces.how == "trained" and traces.entry.meta["seconds_per_image"] > 0
    # its probabilities are the classifier's on the member's own split, from the decoded copy at its size
    data = load_data(project, first.competition)
    decoded = decoded_images(data, (32, 32))
    rows = np.array(decoded.rows(data.train_paths))
    index = {c: i for i, c in enumerate(data.vocab)}
    targets = np.array([index[c] for c in data.train_labels])
    train = ~np.array(data.is_valid)
    expected = fit_predict("classical:em_traces+color_hist/logistic", decoded.images[rows[train]], targets[train],
                           {"valid": decoded.images[rows[~train]]}, seed=42, n_classes=len(data.vocab))["valid"]
    assert np.allclose(traces.entry.arrays["valid_plain"], expected, atol=1e-6)
    assert traces.entry.meta["metrics"]["plain_accuracy"] > 0.3  # well above chance on ten classes
    again = run_ensemble(project, "digits/mixed.yaml", submit=False)
    assert [o.how for o in again.members] == ["cached", "cached"]
    r = ablate(project, "digits/mixed.yaml", cached_only=True)
    assert [row.name for row in r.members] == ["resnet", "traces"] and r.members[1].without is not None
    plan = ens("plan", "digits/mixed.yaml", cwd=root)
    assert plan.returncode == 0 and "classical:em_traces+color_hist/logistic" in plan.stdout, plan.stderr


def test_a_bad_classical_arch_is_one_line(tmp_path, digits_data):
    root = make_project(tmp_path / "p", digits_data, {"mixed": MIXED.replace("em_traces+", "em_trace+")})
    out = ens("validate", "digits/mixed.yaml", cwd=root)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "unknown extractor 'em_trace'" in out.stderr and "did you mean 'em_traces'" in out.stderr
