"""Long work shows numbers (issue 27 item 5): a line per epoch with loss, metric, time and ETAs, in a log as it
happens; TTA bars with their totals; a plan's time for a competition nothing was trained on yet."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines

from conftest import ONE_RESNET, make_project
from pipelines.config import Project

PACKAGE_ROOT = str(Path(list(pipelines.__path__)[0]).parent)  # the ens under test (old or new: what is imported)

TWO_EPOCHS = ONE_RESNET.replace("epochs: 1", "epochs: 2").replace("tta: {n: 0}", "tta: {n: 2}") + \
    "  - {name: lenet, arch: test_resnet, seed: 7, epochs: 1}\n"


class Recorder:
    """The slice of rich's Progress that training and prediction use, recording what they did."""

    def __init__(self):
        self.tasks, self.lines, self.console = {}, [], self

    def add_task(self, description, total=None, **_):
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "done": 0}
        return len(self.tasks) - 1

    def update(self, task, **fields):
        self.tasks[task].update(fields)

    def reset(self, task, total=None, completed=0, description=None, **_):
        self.tasks[task].update(total=total, done=completed, **({"description": description} if description else {}))

    def advance(self, task, amount=1):
        self.tasks[task]["done"] += amount

    def remove_task(self, task):
        pass

    def print(self, text, *a, **k):
        self.lines.append(str(text))


@pytest.mark.slow
def test_epoch_lines_and_tta_totals(tmp_path, digits_data):
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"two": TWO_EPOCHS})
    progress = Recorder()
    run_ensemble(Project(root), "digits/two.yaml", progress=progress)
    epochs = [line for line in progress.lines if ": epoch " in line]
    assert len(epochs) == 3, progress.lines
    first = epochs[0]
    assert first.startswith("resnet (test_resnet): epoch 1/2 · train loss ") and "accuracy 0." in first
    assert "ETA member " in first and ", run ~" in first
    assert epochs[1].startswith("resnet (test_resnet): epoch 2/2") and "ETA member 0s" in epochs[1]
    assert epochs[2].startswith("lenet (test_resnet): epoch 1/1") and "run ~0s" in epochs[2]
    tta = [t for t in progress.tasks.values() if t["description"].lstrip().startswith("TTA")]
    assert len(tta) == 4 and all(t["total"] and t["done"] == t["total"] for t in tta), tta


@pytest.mark.slow
def test_a_log_gets_each_epoch_as_it_ends(tmp_path, digits_data):
    root = make_project(tmp_path / "p", digits_data, {"two": TWO_EPOCHS})
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "digits/two.yaml"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": PACKAGE_ROOT, "HF_HUB_OFFLINE": "1"})
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if ": epoch 1/2" in line:
                assert proc.poll() is None  # printed (flushed) while the run goes on
                assert "train loss" in line and "ETA member" in line
                break
        assert any(": epoch 1/2" in s for s in seen), seen
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert ": epoch 2/2" in rest and proc.returncode == 0, rest
    trained = next(line for line in rest.splitlines() if "resnet (test_resnet) trained in" in line)
    assert "s TTA:" in trained  # the training and the TTA time, as the table's train+TTA column sums them
    assert "train+TTA" in rest
