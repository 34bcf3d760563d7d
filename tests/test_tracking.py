"""Optional MLflow tracking (issue 27 item 10), read back through MLflow's own client from a local store: params
(the resolved ensemble, the overrides), metrics per epoch, per member and the blend's honest score, the CSV and
its validation JSON as artifacts; a cross-validated run's fold models; MLflow imported only when tracking."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines

from conftest import ONE_RESNET, ens, make_project
from pipelines.submission import read_history

PACKAGE_ROOT = str(Path(list(pipelines.__path__)[0]).parent)  # the ens under test (old or new: what is imported)

TRACKED = ONE_RESNET.replace("epochs: 1", "epochs: 2") + "tracking: mlflow\n"


def _runs(uri: str, experiment: str = "digits"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_a_tracked_run_is_an_mlflow_run(tmp_path, digits_data):
    root = make_project(tmp_path / "p", digits_data, {"tracked": TRACKED})
    out = ens("run", "digits/tracked.yaml", "members.resnet.lr=0.004", cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr
    client, runs = _runs(f"sqlite:///{root / 'mlflow.db'}")
    assert len(runs) == 1
    run = runs[0]
    row = read_history(root / "submissions/digits/history.csv")[0]
    assert run.info.status == "FINISHED" and run.data.tags["ens.ensemble_hash"] == row["ensemble_hash"]
    assert run.data.params["overrides"] == "members.resnet.lr=0.004"
    assert run.data.params["members.resnet.lr"] == "0.004" and run.data.params["members.resnet.arch"] == "test_resnet"
    losses = client.get_metric_history(run.info.run_id, "resnet.train_loss")
    assert [m.step for m in losses] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "resnet.accuracy")] == [1, 2]
    assert run.data.metrics["blend.accuracy"] == pytest.approx(float(row["valid_score"]), abs=1e-6)
    assert "member.resnet.tta_accuracy" in run.data.metrics and "test.accuracy" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    csv = row["file"].split("/")[-1]
    assert {csv, csv.replace(".csv", ".validation.json"), "ensemble.json"} <= files
    assert (root / "mlruns").is_dir()  # artifacts in the project, not in the cwd of whoever ran it

    report = ens("report", "digits/tracked.yaml", "members.resnet.lr=0.004", "--cached-only", cwd=root, timeout=600)
    assert report.returncode == 0, report.stderr
    assert any(a.path.startswith("report-tracked") for a in client.list_artifacts(run.info.run_id))


@pytest.mark.slow
def test_a_cross_validated_run_tracks_each_fold_model(tmp_path, digits_data):
    root = make_project(tmp_path / "p", digits_data, {"cv": "validation: cv\n" + ONE_RESNET}, cv="{folds: 2}")
    uri = f"sqlite:///{tmp_path / 'team.db'}"  # a team's store, by MLflow's own variable
    out = ens("run", "digits/cv.yaml", "--track", cwd=root, timeout=600, env_extra={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr
    assert not (root / "mlflow.db").exists()
    client, runs = _runs(uri)
    run = runs[0]
    for fold in (0, 1):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"resnet.fold{fold}.train_loss")] == [1]
        assert f"member.resnet.fold{fold}.tta_accuracy" in run.data.metrics
    assert run.data.params["validation"] == "cv" and "blend.accuracy" in run.data.metrics


def test_without_mlflow_a_tracked_run_is_one_line_before_any_work(project, tmp_path):
    fake = tmp_path / "nomlflow" / "mlflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no mlflow here')\n")
    out = ens("run", "digits/tiny.yaml", "--track", cwd=project,
              env_extra={"PYTHONPATH": f"{fake.parent}:{PACKAGE_ROOT}"})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "pip install 'ens[mlflow]'" in out.stderr and not (project / "cache" / "digits").exists()


def test_mlflow_is_imported_only_when_tracking():
    probe = subprocess.run([sys.executable, "-c", "import sys, pipelines.cli, pipelines.run, pipelines.report; "
                            "print('mlflow' in sys.modules)"], capture_output=True, text=True, cwd=PACKAGE_ROOT)
    assert probe.stdout.split() == ["False"], probe.stderr


def test_a_tracking_server_that_does_not_answer_is_one_line_before_any_work(tmp_path, digits_data):
    """A review's `--track` with an unreachable MLFLOW_TRACKING_URI sat silent for 4 minutes of MLflow's retries
    before its error: ens now asks MLflow for one retry, so the one-line error comes before any training."""
    root = make_project(tmp_path / "p", digits_data, {"one": ONE_RESNET})
    out = ens("run", "digits/one.yaml", "--track", cwd=root, timeout=150,
              env_extra={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking at http://127.0.0.1:9"), out.stderr
    assert not (root / "cache" / "digits").exists() or not any((root / "cache" / "digits").glob("*/probs.npz"))
