"""The submission check names the first bad row; local scoring; combining and metrics."""

import csv

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import log_loss as sk_log_loss

from conftest import ens
from pipelines import ensemble
from pipelines.config import Project, load_competition
from pipelines.submission import SubmissionError, check_submission, score_submission, write_submission


def _write(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def sample(digits_data):
    with open(digits_data / "solution.csv") as f:
        return [tuple(r) for r in csv.reader(f)]


def test_check_accepts_the_answers_and_rejects_each_defect(project, digits_data, sample, tmp_path):
    comp = load_competition(Project(project), "digits")
    sample_path, labels = digits_data / "sample_submission.csv", [str(i) for i in range(10)]
    good = _write(tmp_path / "good.csv", sample)
    assert check_submission(good, sample_path, comp, labels) == 359
    assert score_submission(good, digits_data / "solution.csv", comp) == 1.0
    cases = {
        "missing": (sample[:5] + sample[6:], f"id '{sample[5][0]}' of the sample submission is missing (1 ids missing in all)"),
        "extra": (sample + [("test_9999.png", "3")], "row 361: id 'test_9999.png' is not in the sample submission"),
        "label": (sample[:3] + [(sample[3][0], "cat")] + sample[4:], "row 4: label 'cat' is not one of the competition's classes"),
        "twice": (sample[:3] + [sample[2]] + sample[4:], "row 4: id 'test_0001.png' appears twice"),
        "columns": ([("id", "label")] + sample[1:], "columns ['id', 'label'] differ"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(SubmissionError) as info:
            check_submission(_write(tmp_path / f"{name}.csv", rows), sample_path, comp, labels)
        assert message in str(info.value) and "\n" not in str(info.value), name
    result = ens("check", str(tmp_path / "label.csv"), "-c", "digits", cwd=project)
    assert result.returncode == 1 and "label 'cat'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_write_follows_the_sample_order(project, digits_data, tmp_path):
    comp = load_competition(Project(project), "digits")
    ids = ["test_0002.png", "test_0000.png", "test_0001.png"]
    sample = _write(tmp_path / "sample.csv", [("image_id", "label"), ("test_0000.png", "0"), ("test_0001.png", "0"),
                                              ("test_0002.png", "0")])
    probs = np.eye(3)[[2, 0, 1]]  # ids[i] gets class vocab[...]
    out = write_submission(tmp_path / "s.csv", comp, sample, ids, probs, ["a", "b", "c"])
    assert out.read_text().splitlines() == ["image_id,label", "test_0000.png,a", "test_0001.png,b", "test_0002.png,c"]


def test_combine_and_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    p1, p2 = rng.dirichlet(np.ones(4), 50), rng.dirichlet(np.ones(4), 50)
    y = rng.integers(0, 4, 50)
    np.testing.assert_allclose(ensemble.combine([p1, p2]), (p1 + p2) / 2)
    np.testing.assert_allclose(ensemble.combine([p1, p2], [3, 1]), 0.75 * p1 + 0.25 * p2)
    mixed = ensemble.combine([p1, p2], [1, 2])
    assert ensemble.accuracy(mixed, y) == accuracy_score(y, mixed.argmax(1))
    assert ensemble.log_loss(mixed, y) == pytest.approx(sk_log_loss(y, mixed, labels=range(4)))
    assert ensemble.f1_macro(mixed, y) == pytest.approx(f1_score(y, mixed.argmax(1), average="macro"))
