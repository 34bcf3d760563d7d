"""A code competition end to end on the fake Kaggle server: the real `kaggle` client uploads the weights' dataset,
pushes the notebook (which the fake runs on the public digits test), fetches its CSV, submits the version, and the
fake re-runs it on a different, larger hidden test set to score it. Every failure keeps everything local and ends in
a one-line error with the retry."""

import csv
import shutil
from pathlib import Path

import pytest

from conftest import ens
from fake_kaggle import FakeKaggle
from test_notebook import chosen_of, delivery, notebook_project

from pipelines.config import Project

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

HIDDEN = 600  # hidden test images: more than the public 359, other ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data):
    """The tiny notebook ensemble's members trained once (copied per test: each test's own history and notebooks)."""
    from pipelines.run import run_ensemble

    root = notebook_project(tmp_path_factory.mktemp("code") / "project", digits_data,
                            f"notebook: {{runtime_hours: 1, hidden_test_images: {HIDDEN}}}\n")
    result = run_ensemble(Project(root), "digits/tiny.yaml", submit=False)
    g = result.gathered
    # the notebook checked here once (a passed check is remembered: the tests' pushes skip it, but the first)
    delivery(root, g, result.csv, []).check_here(g, chosen_of(g))
    shutil.rmtree(root / "submissions")
    return root


@pytest.fixture(scope="module")
def hidden(tmp_path_factory, digits_data):
    """The hidden test set: training images under new names, a sample submission of their ids; and the answers."""
    root = tmp_path_factory.mktemp("hidden") / "digits"
    (root / "test_images").mkdir(parents=True)
    answers = {}
    images = sorted((digits_data / "train_images").glob("*/*.png"))[:HIDDEN]
    for i, path in enumerate(images):
        name = f"hidden_{i:04d}.png"
        shutil.copy(path, root / "test_images" / name)
        answers[name] = path.parent.name
    with open(root / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_id", "label"], *[[n, "0"] for n in answers]])
    return root, answers


@pytest.fixture
def project(trained, tmp_path):
    dest = tmp_path / "project"
    shutil.copytree(trained, dest, symlinks=True)
    return dest


@pytest.fixture
def fake(digits_data, hidden, tmp_path):
    server = FakeKaggle(slug="digits", kernels_only=True, public_data=digits_data, hidden_data=hidden[0],
                        hidden_answers=hidden[1], runs_dir=tmp_path / "runs").start()
    yield server
    server.stop()


def kaggle_env(fake: FakeKaggle, tmp_path: Path) -> dict:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp_path / "kaggle-config").mkdir(exist_ok=True)
    return {**fake.env(), "NO_PROXY": "", "no_proxy": "", "TMPDIR": str(tmp),
            "KAGGLE_CONFIG_DIR": str(tmp_path / "kaggle-config"), "ENS_KAGGLE_POLL": "0.5",
            "ENS_KAGGLE_POLL_MAX": "2"}  # a notebook's end seen within 2 s, not after a back-off of up to 60


def history(project: Path) -> list[dict]:
    with open(project / "submissions" / "digits" / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_push_submit_and_a_hidden_rerun_scored(project, fake, tmp_path, hidden):
    env = kaggle_env(fake, tmp_path)
    for memo in (project / "cache" / "digits" / "notebook").glob("*/checked.json"):
        memo.unlink()  # this test makes the check here
    fake.dataset_ready_polls = 2  # processing before READY: ens waits
    fake.output_extra = {"../submission.csv": b"id,label\nnot,ours\n"}  # a name that would land outside
    r = ens("kaggle", "push", "digits/tiny.yaml", "--submit", cwd=project, env_extra=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # the notebook ran here first, offline, and wrote what ens run writes
    assert "same 359 rows" in r.stderr and f"× {HIDDEN} hidden test images" in r.stderr
    # the dataset holds every file of the manifest
    (dataset,) = fake.datasets
    assert dataset == "alice/ens-digits-tiny-models"
    files = fake.datasets[dataset][-1]["files"]
    assert {"ens-manifest.json", "m0-convnext-0.pth", "m1-resnet-0.pth"} <= set(files)
    assert any(n.startswith("ens-") and n.endswith(".whl") for n in files)
    # the notebook was pushed with internet off, ran on the public test, then again on the hidden one to be scored
    push = [q.json for q in fake.requests if q.endpoint == "SaveKernel"]
    assert len(push) == 1 and push[0]["enableInternet"] is False
    assert [run.kind for run in fake.runs] == ["push", "rerun"]
    rerun = fake.runs[1]
    assert sum(p.startswith("digits/test_images/hidden_") for p in rerun.inputs) == HIDDEN
    assert "CreateSubmission" not in fake.endpoints()  # a code competition never gets a CSV upload
    fetched = sorted((project / "submissions" / "digits").glob("*.notebook-v1/*.csv"))
    assert [f.name for f in fetched] == ["submission.csv"]  # only the output file, fetched beside the CSV
    assert "not,ours" not in fetched[0].read_text() and not (project / "submissions" / "submission.csv").exists()
    (sub,) = fake.submissions
    assert sub.score is not None and sub.score > 0.5  # every hidden id predicted (a missing one is an error)
    row = history(project)[-1]
    assert row["destination"] == "kaggle notebook" and row["notebook"] == "alice/ens-digits-tiny/1"
    assert row["status"] == "complete" and float(row["score"]) == pytest.approx(sub.score, abs=1e-5)
    assert row["ref"] == str(sub.ref) and row["dataset"].startswith("alice/ens-digits-tiny-models/1 ")

    # unchanged: the dataset is not uploaded again; the notebook is pushed as version 2
    uploads = fake.endpoints().count("StartBlobUpload")
    r = ens("kaggle", "push", "digits/tiny.yaml", cwd=project, env_extra=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert fake.endpoints().count("StartBlobUpload") == uploads and "not uploaded again" in r.stderr
    assert "passed the check here before" in r.stderr
    assert history(project)[-1]["notebook"] == "alice/ens-digits-tiny/2" and history(project)[-1]["status"] == "ran"
    # ... and submitted by hand, when the hidden test set has an image it cannot read: Kaggle's error, explained
    broken = tmp_path / "broken"
    shutil.copytree(hidden[0], broken)
    (broken / "test_images" / "hidden_0000.png").write_bytes(b"not an image")
    fake.hidden_data = broken
    r = ens("kaggle", "submit", "digits", "alice/ens-digits-tiny/2", cwd=project, env_extra=env, timeout=300)
    line = one_line_error(r)
    assert "Notebook Threw Exception" in line and "rerun's log" in line
    assert history(project)[-1]["status"] == "error" and len(fake.submissions) == 2
    r = ens("submissions", "digits", cwd=project, env_extra=env, timeout=120)
    assert "Notebook Threw Exception: the notebook failed on the hidden test set" in r.stdout


def test_run_on_an_auto_competition_pushes_then_status_carries_on(project, fake, tmp_path):
    """`ens run` on a competition with `submission: auto` asks Kaggle, which says notebooks only: the notebook is
    pushed and (--no-wait) left running; `ens kaggle status --wait` follows it and submits it."""
    comp = project / "competitions" / "digits.yaml"
    comp.write_text(comp.read_text().replace("submission: notebook", "submission: auto"))
    env = kaggle_env(fake, tmp_path)
    r = ens("run", "digits/tiny.yaml", "--no-wait", cwd=project, env_extra=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GetCompetition" in fake.endpoints() and "CreateSubmission" not in fake.endpoints()
    assert history(project)[-1]["status"] == "running+submit" and not fake.submissions
    r = ens("kaggle", "status", "digits", "--wait", cwd=project, env_extra=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert history(project)[-1]["status"] == "complete" and len(fake.submissions) == 1
    r = ens("kaggle", "status", "digits", cwd=project, env_extra=env, timeout=120)
    assert "no notebook of digits is running" in r.stdout


def test_a_dropped_file_stops_before_the_notebook_is_pushed(project, fake, tmp_path):
    fake.drop_files = {"m1-resnet-0.pth"}
    r = ens("kaggle", "push", "digits/tiny.yaml", "--submit", cwd=project, env_extra=kaggle_env(fake, tmp_path),
            timeout=600)
    line = one_line_error(r)
    assert "lacks m1-resnet-0.pth (missing)" in line and "retry: ens kaggle push" in line
    assert "SaveKernel" not in fake.endpoints() and not fake.submissions
    assert history(project)[-1]["destination"] == "not submitted: dataset incomplete"
    assert Path(project / history(project)[-1]["file"]).is_file()  # the CSV stays


def test_a_push_error_in_a_successful_answer_is_an_error(project, fake, tmp_path):
    fake.kernel_error = "Notebook slug is already taken by another user"
    r = ens("kaggle", "push", "digits/tiny.yaml", cwd=project, env_extra=kaggle_env(fake, tmp_path), timeout=600)
    line = one_line_error(r)
    assert "Kaggle refused pushing notebook alice/ens-digits-tiny: Notebook slug is already taken" in line
    assert not fake.runs


@pytest.mark.parametrize("knob, value, said", [
    ("run_timeout", 1, "failed on Kaggle (timeout)"),  # the run is killed after 1 s
    ("python", "/bin/true", "wrote no submission.csv"),  # the notebook "runs" and ends well, writing nothing
], ids=["times out", "writes no csv"])
def test_a_notebook_run_that_fails_on_kaggle_is_named(project, fake, tmp_path, knob, value, said):
    setattr(fake, knob, value)
    r = ens("kaggle", "push", "digits/tiny.yaml", "--submit", cwd=project, env_extra=kaggle_env(fake, tmp_path),
            timeout=600)
    line = one_line_error(r)
    assert f"notebook alice/ens-digits-tiny version 1 {said}" in line
    assert history(project)[-1]["status"] == "notebook error" and not fake.submissions


def test_a_csv_is_never_uploaded_to_a_code_competition(project, fake, tmp_path):
    env = kaggle_env(fake, tmp_path)
    r = ens("run", "digits/tiny.yaml", "--no-submit", cwd=project, env_extra=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "later: ens kaggle push ensembles/digits/tiny.yaml --submit" in r.stdout
    written = sorted((project / "submissions" / "digits").glob("*-tiny.csv"))[-1]
    r = ens("submit", str(written), "-c", "digits", "-m", "by hand", cwd=project, env_extra=env, timeout=120)
    assert "code competition" in one_line_error(r)
    assert "StartSubmissionUpload" not in fake.endpoints() and "CreateSubmission" not in fake.endpoints()
