"""`ens run --on kaggle` against the fake Kaggle server: the real `kaggle` client uploads the units' dataset and
pushes the training kernel, which the fake runs as a local process on a /kaggle-like tree (on this CPU: the
members say `precision: fp32`, so the keys planned for a T4 are the keys computed there); the entries come back,
verified, into the local cache, and the blend proceeds as for members trained here."""

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ens, make_project
from fake_kaggle import FakeKaggle
from test_code_competition import kaggle_env, one_line_error

TWO = """\
competition: digits
defaults:
  pretrained: false
  size: 32
  epochs: 1
  lr: 0.005
  batch_size: 64
  num_workers: 0
  precision: fp32
  aug_transforms: {do_flip: false, max_rotate: 10}
  tta: {n: 1}
members:
  - {name: resnet, arch: test_resnet}
  - {name: convnext, arch: test_convnext}
"""
ONE = TWO.replace("  - {name: convnext, arch: test_convnext}\n", "")
TOLERANCE = 1e-5  # the largest difference allowed between a probability trained here and on the fake Kaggle


def kaggle_project(root: Path, digits_data: Path, body: str = TWO) -> Path:
    make_project(root, digits_data, {"two": body})
    comp = root / "competitions" / "digits.yaml"
    comp.write_text(comp.read_text() + "kaggle: digits\n")
    return root


@pytest.fixture
def fake(digits_data, tmp_path):
    server = FakeKaggle(slug="digits", public_data=digits_data, runs_dir=tmp_path / "runs").start()
    yield server
    server.stop()


def runs(project: Path) -> list[dict]:
    with open(project / "submissions" / "digits" / "kaggle-runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def entries(project: Path) -> dict[str, dict]:
    root = project / "cache" / "digits"
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/meta.json") if p.parent.name != "models"}


def pushes(fake: FakeKaggle) -> list[dict]:
    return [q.json for q in fake.requests if q.endpoint == "SaveKernel"]


@pytest.mark.slow
def test_trained_on_kaggle_gives_the_local_csv(digits_data, fake, tmp_path, monkeypatch):
    """... with the two units trained at once, as on two T4s: each in its own process on its own card (on this
    CPU the fake's notebook has no card; ENS_KAGGLE_LANES, inherited by it, says two)."""
    monkeypatch.setenv("ENS_KAGGLE_LANES", "2")
    here = kaggle_project(tmp_path / "here", digits_data)
    r = ens("run", "digits/two.yaml", "--no-submit", cwd=here, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    there = kaggle_project(tmp_path / "there", digits_data)
    env = kaggle_env(fake, tmp_path)
    fake.gpu_quota_hours = (4.5, 30.0)
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", cwd=there, env_extra=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "weekly GPU quota: 4.5 h of 30.0 h used" in r.stderr  # said before anything is pushed
    assert r.stderr.index("weekly GPU quota") < r.stderr.index("pushed notebook")
    assert "2 unit(s) to train on Kaggle (t4x2) in 1 notebook(s), 2 at once" in r.stderr, r.stderr
    assert "a stated estimate, not yet measured" in r.stderr
    # one notebook, pushed with a GPU (T4 x2 named), internet on, the competition as its input
    (push,) = pushes(fake)
    assert push["enableGpu"] is True and push["enableInternet"] is True
    assert push["machineShape"] == "NvidiaTeslaT4" and push["competitionDataSources"] == ["digits"]
    assert push["sessionTimeoutSeconds"] == 12 * 3600  # Kaggle's stop at the limit; the notebook's own comes first
    (run,) = fake.runs
    assert run.status == "COMPLETE", run.stderr[-3000:]
    told = json.loads((run.working / "ens-run.json").read_text())
    assert told["lanes"] == 2 and "2 at once" in run.stdout
    (a, b) = sorted(told["units"].values(), key=lambda s: s["started"])
    assert {a["lane"], b["lane"]} == {0, 1} and b["started"] < a["started"] + a["seconds"]  # they overlapped
    assert "digits/test_images" in " ".join(run.inputs)
    # the units came back: the same keys as here, made on Kaggle, verified into the cache
    mine, theirs = entries(here), entries(there)
    assert set(mine) == set(theirs) and len(theirs) == 2
    for key, meta in theirs.items():
        assert meta["worker"]["host"] == "kaggle" and meta["worker"]["gpu_kind"] == "t4x2"
        assert meta["worker"]["pid"] != run.proc.pid  # trained in a lane's own process
        assert meta["versions"]["torch"]  # the library versions it was made with stay in its meta
        a = np.load(here / "cache" / "digits" / key / "probs.npz")
        b = np.load(there / "cache" / "digits" / key / "probs.npz")
        for name in ("valid_tta", "test_tta"):
            assert np.abs(a[name] - b[name]).max() <= TOLERANCE
    kept = [sorted(p.name for p in (root / "cache" / "digits" / "models").iterdir()) for root in (here, there)]
    assert kept[0] == kept[1] and len(kept[1]) == 2  # the kept weights came too, under the same training keys
    csvs = [sorted((p / "submissions" / "digits").glob("*.csv")) for p in (here, there)]
    assert csvs[0][0].read_text() == csvs[1][0].read_text()
    (row,) = runs(there)
    assert row["status"] == "fetched" and row["gpu"] == "t4x2" and row["got_gpu"] == "none x0"
    assert float(row["rate"]) > 0 and len(json.loads(row["units"])) == 2
    # again: everything is cached, nothing is sent; the measured rate is used for the next plan
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", "defaults.epochs=2", "members.resnet.epochs=1",
            cwd=there, env_extra=dict(env, ENS_KAGGLE_POLL="0.5"), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 unit(s) to train on Kaggle" in r.stderr and "measured on earlier notebooks" in r.stderr
    assert len(pushes(fake)) == 2


def _tamper(archive: Path) -> None:
    """Flip a byte of the entry's probs.npz inside the unit's archive, leaving its meta's checksum as it was."""
    with zipfile.ZipFile(archive) as z:
        files = {n: z.read(n) for n in z.namelist()}
    probs = bytearray(files["entry/probs.npz"])
    probs[len(probs) // 2] ^= 0xFF
    files["entry/probs.npz"] = bytes(probs)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    archive.write_bytes(buf.getvalue())


@pytest.mark.slow
def test_detach_nothing_sent_twice_and_a_tampered_entry_refused(digits_data, fake, tmp_path):
    project = kaggle_project(tmp_path / "project", digits_data, ONE)
    env = kaggle_env(fake, tmp_path)
    r = ens("run", "digits/two.yaml", "--no-submit", "--no-wait", "--on", "kaggle", cwd=project, env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train on Kaggle in alice/ens-digits-train-" in r.stdout and "ens kaggle status digits" in r.stdout
    # a second run while the notebook runs (its row says running until fetched): nothing is pushed twice
    r = ens("run", "digits/two.yaml", "--no-submit", "--no-wait", "--on", "kaggle", cwd=project, env_extra=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 unit(s) already train in alice/ens-digits-train-" in r.stderr and "not sent again" in r.stderr
    assert len(pushes(fake)) == 1 and len(runs(project)) == 1
    assert fake.wait_runs(600)
    (run,) = fake.runs
    assert run.status == "COMPLETE", run.stderr[-3000:]
    (archive,) = [p for name, p in run.outputs().items() if name.startswith("ens-unit-")]
    _tamper(archive)
    # the archive's checksum in ens-run.json updated too (a consistent corruption): the entry's own checksum
    # in its meta still refuses it
    status = json.loads(run.outputs()["ens-run.json"].read_text())
    (unit,) = status["units"].values()
    unit["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    run.outputs()["ens-run.json"].write_text(json.dumps(status))
    r = ens("kaggle", "status", "digits", cwd=project, env_extra=env)
    assert "resnet: entry refused (probs.npz does not match the checksum in its meta.json)" in r.stdout, r.stdout
    assert entries(project) == {}  # nothing of it entered the cache
    (row,) = runs(project)
    assert row["status"] == "fetched (incomplete)" and "0 of 1 unit(s) back" in row["note"]


def test_a_unit_whose_key_differs_there_is_refused_with_the_reason(digits_data, fake, tmp_path):
    """`precision: auto` planned for a T4 is fp16; the fake's notebook runs on this CPU, where it is fp32: the
    notebook refuses the unit before training it and says why."""
    body = TWO.replace("  precision: fp32\n", "").replace("  - {name: convnext, arch: test_convnext}\n", "")
    project = kaggle_project(tmp_path / "project", digits_data, body)
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", cwd=project,
            env_extra=kaggle_env(fake, tmp_path), timeout=600)
    line = one_line_error(r)
    assert "Kaggle did not report your weekly GPU quota (404 not found: weekly GPU quota)" in r.stderr
    assert "1 unit(s) did not come back from Kaggle (resnet)" in line, fake.runs[0].stdout + fake.runs[0].stderr
    assert "resnet: refused on Kaggle (precision fp32 here, fp16 planned" in line, line + fake.runs[0].stderr
    assert entries(project) == {} and "training" not in fake.runs[0].stdout
    (row,) = runs(project)
    assert row["status"] == "fetched (incomplete)"


def test_on_needs_a_kaggle_slug_and_a_known_machine(digits_data, tmp_path):
    project = make_project(tmp_path / "project", digits_data, {"two": TWO})
    line = one_line_error(ens("run", "digits/two.yaml", "--on", "kaggle:v100", cwd=project))
    assert "--on kaggle:v100: the Kaggle machine is one of t4x2, p100, cpu" in line
    line = one_line_error(ens("run", "digits/two.yaml", "--on", "kaggle", cwd=project))
    assert "has no `kaggle:` slug" in line


@pytest.mark.slow
def test_a_notebook_stopped_by_its_time_limit_is_resumed_by_the_next(digits_data, fake, tmp_path, monkeypatch):
    """A unit longer than a notebook's limit: the notebook ends itself at 85 % of it with the last epoch's
    checkpoint in its output; the next notebook is given that checkpoint and resumes there. Not left to this
    machine's speed (on a quiet machine a whole unit fitted in one notebook and the test failed): the first
    notebook stalls after epoch 2's checkpoint (ENS_TEST_EPOCH_SLEEP, inherited by the fake's notebooks) until its
    deadline; the next resumes past that epoch. The unit trains in a lane's process (ENS_KAGGLE_LANES=2, as on two
    T4s): the deadline stops that process too, and the status says 'out of time', not 'failed'."""
    monkeypatch.setenv("ENS_TEST_EPOCH_SLEEP", "900 after train epoch 2")
    monkeypatch.setenv("ENS_KAGGLE_LANES", "2")
    project = kaggle_project(tmp_path / "project", digits_data, ONE.replace("epochs: 1", "epochs: 4"))
    env = kaggle_env(fake, tmp_path)
    hours = "0.035"  # 126 s: the notebook's own deadline is 107 s after its start, Kaggle's (the fake's) at 126 s
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", "--kaggle-hours", hours, cwd=project,
            env_extra=env, timeout=600)
    line = one_line_error(r)
    assert "resnet: out of time" in line and "checkpoints kept to resume resnet" in line, line
    first = fake.runs[0]
    assert first.status == "COMPLETE" and not first.timed_out  # it ended itself, before Kaggle's limit
    (unit,) = json.loads((first.working / "ens-run.json").read_text())["units"].values()
    assert unit["state"] == "out of time" and unit["lane"] == 0
    (partial,) = (project / "cache" / "digits").glob(".partial-*")
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", "--kaggle-hours", hours, cwd=project,
            env_extra=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    second = fake.runs[-1]
    assert "resuming" in second.stdout, second.stdout + second.stderr
    dataset = fake.datasets[pushes(fake)[-1]["datasetDataSources"][0]][-1]
    assert any(name.startswith("partial-") for name in dataset["files"])  # the checkpoint travelled
    (meta,) = entries(project).values()
    assert meta["resumed_at"] and meta["worker"]["host"] == "kaggle" and len(meta["history"]) == 4
    assert not partial.exists() and len(fake.runs) == 2


def test_plan_on_kaggle_says_what_would_be_sent(digits_data, tmp_path):
    project = kaggle_project(tmp_path / "project", digits_data)
    r = ens("plan", "digits/two.yaml", "--on", "kaggle:p100", "--kaggle-hours", "2", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--on kaggle (p100, internet on): 0 unit(s) cached, 0 in running notebooks, 2 to send" in r.stdout
    assert "notebook 1: convnext, resnet" in r.stdout or "notebook 1: resnet, convnext" in r.stdout
    assert "of the 2 h limit" in r.stdout and not (project / "submissions").exists()


@pytest.mark.slow
def test_ctrl_c_detaches_and_status_carries_on(digits_data, fake, tmp_path):
    project = kaggle_project(tmp_path / "project", digits_data, ONE)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **kaggle_env(fake, tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "digits/two.yaml", "--no-submit", "--on",
                             "kaggle"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    table = project / "submissions" / "digits" / "kaggle-runs.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (table.exists() and fake.runs):
        time.sleep(0.1)
    time.sleep(1.0)  # following now
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "goes on running on Kaggle; `ens kaggle status digits` carries on" in out
    assert runs(project)[0]["status"] == "running" and entries(project) == {}
    r = ens("kaggle", "status", "digits", "--wait", cwd=project, env_extra=kaggle_env(fake, tmp_path), timeout=600)
    assert r.returncode == 0 and "1 of 1 unit(s) back" in r.stdout, r.stdout + r.stderr
    r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", cwd=project,
            env_extra=kaggle_env(fake, tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(pushes(fake)) == 1 and "1 cached" in r.stdout  # blended from what came back; nothing sent again


def test_a_unit_refused_when_kaggles_copy_of_the_data_differs(digits_data, tmp_path):
    """Kaggle's copy of the competition differs from the one here (one training image replaced by another): the
    data's fingerprint differs, so does the key; the notebook refuses the unit and names the fingerprints."""
    theirs = shutil.copytree(digits_data, tmp_path / "kaggle-copy")
    first, other = sorted((theirs / "train_images").glob("*/*.png"))[:2]
    shutil.copy(other, first)
    server = FakeKaggle(slug="digits", public_data=theirs, runs_dir=tmp_path / "runs").start()
    try:
        project = kaggle_project(tmp_path / "project", digits_data, ONE)
        r = ens("run", "digits/two.yaml", "--no-submit", "--on", "kaggle", cwd=project,
                env_extra=kaggle_env(server, tmp_path), timeout=600)
    finally:
        server.stop()
    line = one_line_error(r)
    assert "resnet: refused on Kaggle (data fingerprint " in line and "(Kaggle's copy of the competition's files" in line
    assert "precision" not in line and entries(project) == {}


def test_two_cards_train_two_units_at_once_in_the_plan(monkeypatch):
    """On two T4s a notebook trains two units at once: four units of 40 min fit one 2 h notebook's deadline
    (85 %: 102 min) as two pairs; one after another they need two notebooks. A notebook that got one card (or none) trains one at a
    time, and the estimate is the time the last card ends."""
    from types import SimpleNamespace as NS

    from pipelines.remote.kernel import lanes
    from pipelines.remote.runs import OVERHEAD, UNIT_OVERHEAD, estimate, plan

    member = NS(total_epochs=10, final_size=224)
    rate = (40 * 60 - UNIT_OVERHEAD) / (1000 * 10)  # 40 min per unit, its overhead included
    units = [NS(images=1000, member=member, label=f"u{i}") for i in range(4)]
    assert len(plan(units, rate, 2.0, lanes=2)) == 1 and len(plan(units, rate, 2.0, lanes=1)) == 2
    assert estimate(units, rate, 2) == OVERHEAD + 2 * 40 * 60
    assert estimate(units[:3], rate, 2) == OVERHEAD + 2 * 40 * 60  # the third waits for the first card
    assert estimate(units, rate, 1) == OVERHEAD + 4 * 40 * 60
    # a unit longer than a notebook takes one card to the deadline (then resumes); the other card is not left idle
    long, short = (NS(images=1000 * h, member=member, label=f"{h}") for h in (30, 9))  # 20 h, 6 h at this rate
    assert plan([long, short], rate, 12.0, lanes=2) == [[long, short]]
    assert plan([long, short], rate, 12.0, lanes=1) == [[long], [short]]
    monkeypatch.delenv("ENS_KAGGLE_LANES", raising=False)
    assert lanes(2, {"count": 2}) == 2 and lanes(2, {"count": 1}) == 1 and lanes(2, {"count": 0}) == 1
    assert lanes(1, {"count": 2}) == 1  # a P100 notebook that got two cards still trains as planned
    monkeypatch.setenv("ENS_KAGGLE_LANES", "2")
    assert lanes(1, {"count": 0}) == 2
