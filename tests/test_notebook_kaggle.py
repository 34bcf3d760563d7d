"""A code competition's steps on Kaggle (pipelines/notebook/push.py) against the fake server with the real client,
around a toy notebook (tests/test_fake_kaggle_code.py's: no training): Kaggle's CSV compared with the one checked
here, each notebook submitted once whatever cuts the call off, and the weights' dataset compared by content."""

import _thread
import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from fake_kaggle import FakeKaggle
from test_fake_kaggle_code import HIDDEN, MODEL, PUBLIC, SLUG, _images, _kernel

from pipelines import kaggle
from pipelines.config import Competition, Project, TrainLayout
from pipelines.notebook.bundle import MANIFEST, Bundle
from pipelines.notebook.push import DESTINATION, NotebookDelivery, carry_on, follow_up, open_rows, submit_ran
from pipelines.submission import UNKNOWN, Interrupted, append_history, read_history

KERNEL = "alice/ens-sub"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake (a code competition) with the toy notebook's dataset, the environment pointing ens's client at it."""
    public, hidden = tmp_path / "public", tmp_path / "hidden"
    _images(public, PUBLIC)
    _images(hidden, HIDDEN)
    for label in sorted(set(PUBLIC.values())):  # training images: the classes ens reads from the data
        (public / "train" / label).mkdir(parents=True)
        Image.new("L", (4, 4)).save(public / "train" / label / "a.png")
    server = FakeKaggle(slug=SLUG, kernels_only=True, public_data=public, hidden_data=hidden, hidden_answers=HIDDEN,
                        pending_polls=0, runs_dir=tmp_path / "runs").start()
    server.run_timeout = server.rerun_timeout = 30
    server.add_dataset("alice/ens-models", {"model.json": MODEL})
    for name in list(os.environ):
        if name.upper().startswith("KAGGLE_") or name.lower() in ("no_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
    for name in ("home", "tmp", "kaggle-config"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("ENS_KAGGLE_POLL", "0.2")
    monkeypatch.setenv("ENS_KAGGLE_POLL_MAX", "2")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield server
    finally:
        server.stop()


def _competition(fake: FakeKaggle) -> Competition:
    return Competition(name="toy", kaggle=SLUG, data_dir=str(fake.public_data), test_images="test",
                       train=TrainLayout(layout="folders", folder="train"), submission="notebook")


def _ran(fake: FakeKaggle, tmp_path: Path) -> int:
    """The toy notebook pushed and run on the public test images (it writes PUBLIC's labels): its version."""
    version = kaggle.push_kernel(_kernel(tmp_path, fake, f"v{len(fake.runs) + 1}"))["version"]
    assert fake.wait_runs(60) and fake.runs[-1].status == "COMPLETE", fake.runs[-1].stderr
    return version


def _delivery(fake: FakeKaggle, tmp_path: Path, version: int, labels: dict, name: str = "here",
              status: str = "running+submit", row_id: str = "") -> NotebookDelivery:
    """A delivery of the notebook's `version` whose CSV checked here holds `labels`, and its history row (a new one,
    or `row_id`'s)."""
    project = Project(tmp_path)
    csv = tmp_path / "submissions" / "toy" / f"{name}.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("image_id,label\n" + "".join(f"{i},{l}\n" for i, l in labels.items()))
    history = csv.parent / "history.csv"
    d = NotebookDelivery(project, _competition(fake), fake.public_data, sorted(set(PUBLIC.values())), csv,
                         project.relative(csv), "toy v1", history, say=lambda text: None, first_poll=0.2)
    d.row_id = row_id or append_history(history, file=d.shown, destination=DESTINATION, status=status,
                                        notebook=f"{KERNEL}/{version}", message="toy v1")
    return d


def _row(d: NotebookDelivery) -> dict:
    return next(r for r in read_history(d.history) if r["id"] == d.row_id)


# --------------------------------------------------------------------------------------------- item 8
def test_a_kaggle_csv_with_other_labels_is_a_notebook_error_and_not_submitted(fake, tmp_path):
    """Issue 24 item 8: every label of Kaggle's run differing from the CSV checked here was called 'another
    device's arithmetic' and submitted. Beyond the tolerance it is a notebook error, nothing submitted; --force
    submits it."""
    version = _ran(fake, tmp_path)
    flipped = {i: str((int(l) + 1) % 10) for i, l in PUBLIC.items()}
    d = _delivery(fake, tmp_path, version, flipped)
    delivery = carry_on(d, KERNEL, version, submit=True, wait_seconds=30)
    assert "differs from the one checked here on 3 of 3 rows" in delivery.error and "--force" in delivery.error
    assert _row(d)["status"] == "notebook error" and "differs" in _row(d)["note"]
    assert not fake.submissions and "CreateCodeSubmission" not in fake.endpoints()
    forced = submit_ran(d.project, d.comp, f"{KERNEL}/{version}", None, wait_seconds=30, say=lambda text: None,
                        force=True)
    assert forced.ref and len(fake.submissions) == 1 and _row(d)["status"] == "complete"


def test_probabilities_may_move_in_their_last_digits_only(tmp_path):
    from pipelines.notebook.verify import KAGGLE_TOLERANCE, submission_difference

    comp = Competition(name="x", submission_kind="probability", positive_class="b", metric="roc_auc")
    here, there = tmp_path / "here.csv", tmp_path / "there.csv"
    here.write_text("image_id,label\n1.png,0.500000\n2.png,0.250000\n")
    there.write_text("image_id,label\n1.png,0.500400\n2.png,0.250000\n")
    assert submission_difference(there, here, comp) and not submission_difference(there, here, comp, KAGGLE_TOLERANCE)
    there.write_text("image_id,label\n1.png,0.502000\n2.png,0.250000\n")
    assert "1 of 2 rows (first 1.png: 0.502000 vs 0.500000)" in submission_difference(there, here, comp,
                                                                                      KAGGLE_TOLERANCE)


# --------------------------------------------------------------------------------------------- item 9
def test_two_processes_carrying_on_with_one_notebook_submit_it_once(fake, tmp_path):
    """Issue 24 item 9: two `ens kaggle status` at once both submitted a `running+submit` notebook (and recorded one
    ref): the row is claimed under the history lock before CreateCodeSubmission."""
    version = _ran(fake, tmp_path)
    first = _delivery(fake, tmp_path, version, PUBLIC, name="a")
    second = _delivery(fake, tmp_path, version, PUBLIC, name="b", row_id=first.row_id)  # its own fetched copy
    results = {}
    threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.shown, carry_on(d, KERNEL, version, True,
                                                                                          30)))
               for d in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(fake.submissions) == 1 and fake.endpoints().count("CreateCodeSubmission") == 1
    assert _row(first)["ref"] == str(fake.submissions[0].ref) and _row(first)["status"] == "complete"
    assert len(results) == 2 and sum("not submitted again" in r.note for r in results.values()) == 1


def test_a_submission_cut_off_by_a_timeout_is_unknown_then_found_on_kaggles_list(fake, tmp_path, monkeypatch):
    """Issue 24 item 9: a time-out of CreateCodeSubmission (Kaggle took it, the answer was lost) was recorded as
    `ran` / 'not submitted'. It is `unknown`; the next `ens kaggle status` finds it on Kaggle's list and sends
    nothing again."""
    version = _ran(fake, tmp_path)
    d = _delivery(fake, tmp_path, version, PUBLIC)
    fake.mute = {"CreateCodeSubmission"}
    monkeypatch.setenv("ENS_KAGGLE_TIMEOUT", "10")  # the client starts, sends, and its answer never comes
    delivery = carry_on(d, KERNEL, version, submit=True, wait_seconds=30)
    assert delivery.status == UNKNOWN and "outcome unknown" in delivery.error
    assert _row(d)["status"] == UNKNOWN and len(fake.submissions) == 1  # Kaggle has it
    fake.mute = set()
    monkeypatch.setenv("ENS_KAGGLE_TIMEOUT", "30")
    assert follow_up(d.project, d.comp, wait=True, say=lambda text: None) == []  # nothing open: nothing sent
    assert len(fake.submissions) == 1 and fake.endpoints().count("CreateCodeSubmission") == 1
    assert _row(d)["ref"] == str(fake.submissions[0].ref) and _row(d)["status"] in ("pending", "complete")


def test_ctrl_c_during_the_submission_leaves_it_unknown_and_it_is_not_sent_again(fake, tmp_path):
    """Issue 24 item 9: Ctrl-C during CreateCodeSubmission left the row `running+submit`, and the next `ens kaggle
    status` submitted the notebook a second time."""
    version = _ran(fake, tmp_path)
    d = _delivery(fake, tmp_path, version, PUBLIC)
    fake.mute = {"CreateCodeSubmission"}
    threading.Thread(target=lambda: fake.muted.wait(60) and _thread.interrupt_main(), daemon=True).start()
    with pytest.raises((Interrupted, KeyboardInterrupt)):  # (KeyboardInterrupt: the old code let it through)
        carry_on(d, KERNEL, version, submit=True, wait_seconds=30)
    assert _row(d)["status"] == UNKNOWN and len(fake.submissions) == 1
    fake.mute = set()
    follow_up(d.project, d.comp, wait=True, say=lambda text: None)
    assert len(fake.submissions) == 1 and not open_rows(d.history)
    assert _row(d)["ref"] == str(fake.submissions[0].ref)


# --------------------------------------------------------------------------------------------- item 10
def _bundle(folder: Path, weights: bytes, content: str) -> Bundle:
    folder.mkdir(parents=True)
    (folder / "m0-net-0.pth").write_bytes(weights)
    manifest = {"ensemble": "tiny", "content": content, "files": {"m0-net-0.pth": len(weights)}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return Bundle(folder, manifest, content)


def test_a_dataset_with_new_content_of_the_same_sizes_is_uploaded(fake, tmp_path):
    """Issue 24 item 10: retrained weights of one architecture keep their size, and so does the manifest: the
    dataset was 'already holding' the new content by names and sizes, and the notebook then found no manifest of
    its content on Kaggle."""
    d = _delivery(fake, tmp_path, 1, PUBLIC)
    old = _bundle(tmp_path / "old", b"A" * 100, "a" * 16)
    new = _bundle(tmp_path / "new", b"B" * 100, "b" * 16)
    assert d.upload(old, "alice") == "alice/ens-toy-tiny-models/1"
    assert d.upload(new, "alice") == "alice/ens-toy-tiny-models/2"
    stored = fake.datasets["alice/ens-toy-tiny-models"][-1]["files"]
    assert stored["m0-net-0.pth"] == b"B" * 100 and json.loads(stored[MANIFEST])["content"] == "b" * 16
    assert d.upload(new, "alice") == "alice/ens-toy-tiny-models/2"  # the same content: not uploaded again
