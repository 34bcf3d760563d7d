"""Every verb checks its arguments before any training, and prints paths that can be typed as they are: a bad
option is one line at once, with nothing trained (no cache entry written)."""

import re
import shutil

import pytest

from conftest import ONE_RESNET, ens, make_project


def _nothing_trained(project) -> bool:
    return not any((project / "cache").rglob("meta.json"))


def _one_line(result, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


@pytest.mark.parametrize("args, text", [
    (("eval", "digits/tiny.yaml", "--on", "/nonexistent"), "/nonexistent: no such folder"),
    (("bench", "digits/tiny.yaml", "--batch", "0"), "--batch 0: give a whole number of at least 1"),
    (("ablate", "digits/tiny.yaml", "--top", "0"), "--top 0: give a whole number of at least 1"),
    (("ablate", "digits/tiny.yaml", "--rounds", "0"), "--rounds 0: give a whole number of at least 1"),
    (("report", "digits/tiny.yaml", "--out", "ensembles"), "--out ensembles: is a folder; give the HTML file's path"),
])
def test_a_bad_argument_is_said_before_any_training(project, args, text):
    # ens eval ... --on /nonexistent trained four members (≈ 40 s) before saying "no such folder"
    _one_line(ens(*args, cwd=project), 1, text)
    assert _nothing_trained(project)


def test_eval_names_a_class_folder_the_competition_lacks_before_training(project, tmp_path):
    other = tmp_path / "other"
    (other / "cat").mkdir(parents=True)
    _one_line(ens("eval", "digits/tiny.yaml", "--on", str(other), cwd=project), 1,
              "class folder 'cat' is not a class of the competition")
    assert _nothing_trained(project)


def test_check_finds_the_csv_a_run_printed_from_outside_the_project(project, digits_data, tmp_path):
    # `ens run --project P` from elsewhere printed submissions/... (relative to the project): `ens check` of that
    # path was a FileNotFoundError traceback
    csv = project / "submissions" / "digits" / "run.csv"
    csv.parent.mkdir(parents=True)
    shutil.copy(digits_data / "solution.csv", csv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = ens("check", "submissions/digits/run.csv", "-c", "digits", "--project", str(project), cwd=elsewhere)
    assert out.returncode == 0 and "ok (359 rows)" in out.stdout and "accuracy on the local answers: 1.0000" in out.stdout, \
        out.stderr
    _one_line(ens("check", "submissions/digits/nope.csv", "-c", "digits", "--project", str(project), cwd=elsewhere),
              1, "submissions/digits/nope.csv: no such file (looked in the current folder and in the project")


def test_printed_paths_can_be_typed_from_the_current_folder(tmp_path, monkeypatch):
    from pipelines.config import Project

    inside = tmp_path / "p" / "submissions" / "x.csv"
    inside.parent.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "p")
    assert Project.shown(inside) == "submissions/x.csv"
    monkeypatch.chdir(inside.parent)
    assert Project.shown(inside) == "x.csv"
    elsewhere = tmp_path / "q"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Project.shown(inside) == str(inside)  # outside the current folder: absolute


def test_a_batch_larger_than_the_training_images_is_refused_before_training(tmp_path, digits_data):
    """fastai drops the last partial batch: a batch above the training images took no step, and the chance-level
    model was cached as trained, blended and submitted (a review; a new user's 50-image stand-in too)."""
    root = make_project(tmp_path / "p", digits_data, {"one": ONE_RESNET})
    out = ens("run", "digits/one.yaml", "defaults.batch_size=5000", cwd=root)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(r"batch_size 5000 is more than the [0-9]+ training images", out.stderr), out.stderr
    assert not list((root / "cache").glob("digits/*/probs.npz"))


@pytest.mark.parametrize("name", ["run.log", "sub/report.html"])
def test_report_out_must_be_an_html_path_in_a_folder_that_exists(project, name):
    """A review's `--out` replaced an existing log (and /dev/full), and a file as folder was a traceback."""
    target = project / name
    if name.endswith(".log"):
        target.write_text("keep me")
    out = ens("report", "digits/tiny.yaml", "--cached-only", "--out", str(target), cwd=project)
    assert out.returncode != 0 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not name.endswith(".log") or target.read_text() == "keep me"
