"""A two-class competition declared by a labels CSV, submitting the probability of a positive class and scored
by ROC AUC (seed 001's deepfakes, seed 000's real/fake, seed 003's 'Pepe or not'), built from the digits as
'odd or even'; per-class metrics and confusion matrices stored for members and the ensemble."""

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from pipelines import ensemble
from pipelines.config import Project
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow

ODD_EVEN = """\
competition: oddeven
defaults: {pretrained: false, size: 32, epochs: 2, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 1},
           aug_transforms: {do_flip: false}}
members:
  - {name: resnet, arch: test_resnet}
  - {name: effnet, arch: test_efficientnet}
"""


def _parity(label: str) -> str:
    return "odd" if int(label) % 2 else "even"


@pytest.fixture(scope="module")
def oddeven(tmp_path_factory, digits_data):
    """The competition built, and the ensemble run once: (project, answers, RunResult)."""
    tmp_path = tmp_path_factory.mktemp("oddeven")
    data = tmp_path / "oddeven"
    (data / "train").mkdir(parents=True)
    rows = []
    for p in sorted(digits_data.glob("train_images/*/*.png")):
        shutil.copy(p, data / "train" / p.name)
        rows.append((p.stem, _parity(p.parent.name)))
    with open(data / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *rows])
    shutil.copytree(digits_data / "test_images", data / "test")
    with open(digits_data / "solution.csv") as f:
        answers = [(r["image_id"].removesuffix(".png"), _parity(r["label"])) for r in csv.DictReader(f)]
    with open(data / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "odd"), *((i, "0.5") for i, _ in answers)])
    with open(data / "solution.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "odd"), *answers])
    root = tmp_path / "project"
    (root / "competitions").mkdir(parents=True)
    (root / "competitions/oddeven.yaml").write_text(f"""\
data_dir: {data}
train: {{layout: csv, csv: train.csv, id_column: id, label_column: label, path_template: "train/{{id}}.png"}}
test_images: test
test_id: stem
id_column: id
target_column: odd
submission_kind: probability
positive_class: odd
metric: roc_auc
solution: solution.csv
""")
    (root / "ensembles/oddeven").mkdir(parents=True)
    (root / "ensembles/oddeven/both.yaml").write_text(ODD_EVEN)
    return root, dict(answers), run_ensemble(Project(root), "oddeven/both.yaml")


def test_probability_submission_scored_by_roc_auc(oddeven):
    root, answers, result = oddeven
    with open(result.csv) as f:
        rows = list(csv.DictReader(f))
    p = np.array([float(r["odd"]) for r in rows])
    assert len(rows) == 359 and ((0 <= p) & (p <= 1)).all() and len(np.unique(p)) > 50  # probabilities, not labels
    y = np.array([answers[r["id"]] == "odd" for r in rows])
    assert result.test_score == pytest.approx(roc_auc_score(y, p)) and result.test_score > 0.8
    for o in result.members:  # each member scored the same way
        assert 0.5 < o.test_score <= 1
    # validation: the ensemble's ROC AUC, computed independently
    targets = result.members[0].entry.arrays["valid_targets"]
    mean = np.mean([o.entry.arrays["valid_tta"] for o in result.members], axis=0)
    assert result.valid_score == pytest.approx(roc_auc_score(targets == 1, mean[:, 1]))
    assert result.members[0].entry.vocab == ["even", "odd"]


def test_per_class_metrics_and_confusion_are_stored(oddeven):
    root, _, result = oddeven
    entry = result.members[0].entry
    stored = entry.meta["per_class"]["tta"]
    y, probs = entry.arrays["valid_targets"], entry.arrays["valid_tta"]
    precision, recall, f1, support = precision_recall_fscore_support(y, probs.argmax(1), labels=[0, 1], zero_division=0)
    np.testing.assert_allclose(stored["precision"], precision, atol=1e-6)
    np.testing.assert_allclose(stored["recall"], recall, atol=1e-6)
    np.testing.assert_allclose(stored["f1"], f1, atol=1e-6)
    assert stored["support"] == support.tolist() and stored["classes"] == ["even", "odd"]
    assert stored["confusion"] == confusion_matrix(y, probs.argmax(1), labels=[0, 1]).tolist()
    assert {"plain_roc_auc", "tta_roc_auc", "plain_accuracy"} <= set(entry.meta["metrics"])
    validation = json.loads(result.csv.with_suffix(".validation.json").read_text())
    assert validation["metric"] == "roc_auc" and validation["score"] == pytest.approx(result.valid_score)
    assert np.sum(validation["per_class"]["confusion"]) == len(y)


def test_per_class_matches_sklearn_on_many_classes():
    rng = np.random.default_rng(1)
    probs, y = rng.dirichlet(np.ones(5), 200), rng.integers(0, 5, 200)
    got = ensemble.per_class(probs, y, list("abcde"))
    precision, recall, f1, _ = precision_recall_fscore_support(y, probs.argmax(1), labels=range(5), zero_division=0)
    np.testing.assert_allclose(got["f1"], f1, atol=1e-6)
    assert got["confusion"] == confusion_matrix(y, probs.argmax(1), labels=range(5)).tolist()


def test_cross_validated_with_groups_from_the_labels_csv_and_a_stacked_blend(oddeven, tmp_path):
    """cv on a labels-CSV competition: the groups come from a column of train.csv (no group straddles folds), the
    stacked blend's roc_auc is its nested-CV estimate, and the CSV holds probabilities of the fold-mean blend."""
    root = tmp_path / "project"
    shutil.copytree(oddeven[0], root, ignore=shutil.ignore_patterns("submissions"))
    comp_path = root / "competitions/oddeven.yaml"
    data = tmp_path / "data"
    shutil.copytree(comp_path.read_text().split("data_dir: ")[1].split("\n")[0], data)
    with open(data / "train.csv") as f:
        rows = list(csv.DictReader(f))
    with open(data / "train.csv", "w", newline="") as f:  # 30 "writers", each with images of both classes
        csv.writer(f).writerows([("id", "label", "writer"),
                                 *((r["id"], r["label"], f"w{int(r['id'][6:]) % 30}") for r in rows)])
    text = comp_path.read_text()
    comp_path.write_text(text.replace(f"data_dir: {text.split('data_dir: ')[1].split(chr(10))[0]}", f"data_dir: {data}")
                         + "cv: {folds: 3, group_column: writer}\n")
    (root / "ensembles/oddeven/cv.yaml").write_text(
        ODD_EVEN.replace("epochs: 2", "epochs: 1").replace("competition: oddeven",
                                                           "competition: oddeven\nvalidation: cv\ncombine: stack"))
    result = run_ensemble(Project(root), "oddeven/cv.yaml")
    g = result.gathered
    writer = {f"train/{r['id']}.png": f"w{int(r['id'][6:]) % 30}" for r in rows}
    folds_of = {}
    for path, fold in zip(g.data.train_paths, g.fold_ids):
        folds_of.setdefault(writer[path], set()).add(fold)
    assert all(len(f) == 1 for f in folds_of.values()) and sorted({f for s in folds_of.values() for f in s}) == [0, 1, 2]
    p = [o.entry.arrays["valid_tta"] for o in result.members]
    y = result.members[0].entry.arrays["valid_targets"]
    honest, _ = ensemble.nested_cv_score(p, y, np.array(g.fold_ids), ensemble.stacking_fitter(), "roc_auc")
    assert result.valid_score == pytest.approx(honest) and len(y) == len(g.data.train_paths)
    model = ensemble.stacking_fit(p, y)
    test = ensemble.stacking_predict(model, [o.entry.arrays["test_tta"] for o in result.members])
    with open(result.csv) as f:
        written = {r["id"]: float(r["odd"]) for r in csv.DictReader(f)}
    ids = [str(i).removesuffix(".png") for i in result.members[0].entry.arrays["test_ids"]]
    np.testing.assert_allclose([written[i] for i in ids], test[:, 1], atol=1e-5)
