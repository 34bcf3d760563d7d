"""The training notebook's lanes (two T4s: two units at once, each in its own process), at the moments an outside
review attacked: the deadline while a lane is about to start a unit or has just written one, a failure outside
training. Driven on the kernel's own parts with real processes and files; the whole notebook runs in
test_kaggle_train.py against the fake Kaggle server."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from pipelines.errors import EnsError
from pipelines.remote.kernel import Mirror, Status, Training, _run_unit, at_deadline


def _status(out: Path, keys: list[str]) -> Status:
    out.mkdir(parents=True, exist_ok=True)
    return Status(out, {"content": "c0ffee", "units": [{"key": k, "label": k} for k in keys]})


def _unit(key: str) -> dict:
    return {"key": key, "label": key, "train": f"t-{key}", "member": "m", "fold": None}


def _notebook(tmp_path: Path, partials: dict | None = None) -> NS:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return NS(manifest={"partials": partials or {}}, manifest_path=tmp_path / "dataset" / "manifest.json",
              out=tmp_path / "out", cache=NS(root=cache, partial=lambda train: cache / f".partial-{train}"))


def test_after_the_deadline_no_unit_and_no_process_starts_and_those_started_are_killed(tmp_path):
    """The review: a lane took the next unit while the watchdog was still writing, and its process outlived the
    notebook (Kaggle's runner waits for it: the session ran past its limit)."""
    training = Training()
    first, later = _unit("a"), _unit("b")
    assert training.start(first, Mirror(tmp_path / "none", tmp_path / "a.zip"))
    proc = training.spawn("a", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    (held,) = training.stop()
    assert held["unit"] is first and proc.wait(timeout=10) != 0  # killed
    assert not training.start(later, Mirror(tmp_path / "none", tmp_path / "b.zip"))
    started = []
    assert training.spawn("a", lambda: started.append(1)) is None and not started


def test_a_unit_whose_archive_is_written_is_done_at_the_deadline_the_other_keeps_its_checkpoint(tmp_path):
    """The review: the deadline between a unit's archive and its 'done' left it 'training' with neither file nor
    checkpoint in the status; the next notebook trained it again from scratch."""
    out = tmp_path / "out"
    status = _status(out, ["a", "b"])
    training = Training()
    for key in ("a", "b"):
        folder = tmp_path / f"partial-{key}"
        folder.mkdir()
        (folder / "checkpoint.pth").write_bytes(b"epoch 3")
        training.start(_unit(key), Mirror(folder, out / f"ens-partial-t-{key}.zip"))
        status.unit(key, state="training", started=1.0)
    with zipfile.ZipFile(out / "ens-unit-a.zip", "w") as z:
        z.writestr("entry/meta.json", "{}")
    at_deadline(status, training, out)
    told = json.loads((out / "ens-run.json").read_text())
    assert told["units"]["a"]["state"] == "done" and told["units"]["a"]["file"] == "ens-unit-a.zip"
    assert len(told["units"]["a"]["sha256"]) == 64
    assert told["units"]["b"] == {**told["units"]["b"], "state": "out of time", "partial": "ens-partial-t-b.zip"}
    assert zipfile.ZipFile(out / "ens-partial-t-b.zip").read("checkpoint.pth") == b"epoch 3"
    assert told["out_of_time"] and told["finished"]
    status.unit("b", state="failed")  # a lane that wakes after the deadline does not write over it
    assert json.loads((out / "ens-run.json").read_text())["units"]["b"]["state"] == "out of time"


def test_a_failure_outside_training_is_reported_and_the_lane_goes_on(tmp_path):
    """The review: a damaged checkpoint (or a full output disk) raised in a lane's thread; the thread died
    silently, the unit stayed 'training' and the notebook ended 'complete'."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "partial-t-a.zip").write_bytes(b"not a zip")
    nb = _notebook(tmp_path, {"t-a": {"file": "partial-t-a.zip"}})
    status = _status(nb.out, ["a"])
    training, trained = Training(), []
    _run_unit(nb, status, training, _unit("a"), lambda: trained.append(1))
    unit = json.loads((nb.out / "ens-run.json").read_text())["units"]["a"]
    assert unit["state"] == "failed" and unit["reason"] and not trained
    assert training.held == {}  # nothing left for the watchdog to speak for


def test_poll_waits_from_the_environment_are_checked(monkeypatch):
    from pipelines.notebook.push import _poll

    calls = []
    monkeypatch.setenv("ENS_KAGGLE_POLL", "0")
    monkeypatch.setenv("ENS_KAGGLE_POLL_MAX", "0")
    _poll(lambda: calls.append(1), lambda answer: False, 1.0, 0.5, print)
    assert len(calls) <= 6  # 0 means 0.1 s, not a loop without pause (15,000 calls a second)
    monkeypatch.setenv("ENS_KAGGLE_POLL_MAX", "abc")
    with pytest.raises(EnsError, match="ENS_KAGGLE_POLL_MAX='abc': give the seconds as a number"):
        _poll(lambda: None, lambda answer: True, 1.0, 1.0, print)
    monkeypatch.setenv("ENS_KAGGLE_LANES", "two")
    from pipelines.remote.kernel import lanes

    with pytest.raises(EnsError, match="ENS_KAGGLE_LANES='two'"):
        lanes(2, {"count": 2})
