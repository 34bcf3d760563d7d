"""Resume: a member interrupted (SIGINT, as Ctrl-C) after some epochs picks up at the next epoch with the
schedule where it was, and reaches exactly what an uninterrupted run reaches."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_project
from pipelines.config import Project
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow

SCRATCH = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 4, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 1},
           aug_transforms: {do_flip: false}}
members:
  - {name: resnet, arch: test_resnet}
"""

# a pretrained body (from a weights file the test writes): a frozen epoch, then the unfrozen fit
PRETRAINED = SCRATCH.replace("pretrained: false", "pretrained: WEIGHTS, freeze_epochs: 1").replace("epochs: 4", "epochs: 3")


def _checkpoint_epochs(root):
    import torch

    for path in (root / "cache/digits").glob(".partial-*/checkpoint.pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            continue
        return state["phase"], state["epochs_done"]
    return None


@pytest.mark.parametrize("kind,stop_at", [("scratch", ("train", 2)), ("pretrained", ("train", 1))])
def test_interrupted_member_resumes_to_the_same_result(digits_data, tmp_path, kind, stop_at):
    text = SCRATCH
    if kind == "pretrained":
        import timm
        import torch

        torch.manual_seed(0)
        weights = tmp_path / "body.pth"
        torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
        text = PRETRAINED.replace("WEIGHTS", str(weights))
    root = make_project(tmp_path / "p", digits_data, {"one": text})
    # Ctrl-C mid-epoch, in the epoch after `stop_at`'s checkpoint: at that named point (ENS_TEST_KILL_AT), not
    # after polling for the checkpoint, which misses the one-epoch window on a loaded machine
    kill_at = f"SIGINT after {stop_at[0]} epoch {stop_at[1]}"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "digits/one.yaml"], cwd=root,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", ENS_TEST_KILL_AT=kill_at), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 130 and "interrupted" in proc.stdout, proc.stdout[-2000:]
    assert _checkpoint_epochs(root) == stop_at
    assert not [p for p in (root / "cache/digits").iterdir() if not p.name.startswith(".")]  # no entry yet

    resumed = run_ensemble(Project(root), "digits/one.yaml")
    meta = resumed.members[0].entry.meta
    assert meta["resumed_at"].startswith(f"{stop_at[0]} epoch ") and int(meta["resumed_at"].split()[-1]) >= stop_at[1]
    assert not list((root / "cache/digits").glob(".partial-*"))  # finished: checkpoints dropped
    epochs = [(r["phase"], r["epoch"]) for r in meta["history"]]
    assert epochs == sorted(set(epochs), key=epochs.index) and len(epochs) == (4 if kind == "scratch" else 1 + 3)

    reference = run_ensemble(Project(make_project(tmp_path / "ref", digits_data, {"one": text})), "digits/one.yaml")
    assert reference.members[0].entry.meta["resumed_at"] is None
    for name in ("valid_plain", "valid_tta", "test_tta"):
        np.testing.assert_allclose(resumed.members[0].entry.arrays[name], reference.members[0].entry.arrays[name],
                                   rtol=0, atol=1e-6)


def test_out_of_memory_restarts_from_the_last_epoch_with_half_the_micro_batch(project, monkeypatch, tmp_path):
    """The CUDA path's logic on the CPU: a planned micro-batch (no probe possible here) and an out-of-memory
    error injected in the third epoch; training resumes from epoch two's checkpoint with micro-batch 32 × 2."""
    import torch
    from fastai.callback.core import Callback

    from pipelines import train
    from pipelines.config import Member, load_competition
    from pipelines.data import load_data
    from pipelines.memory import MicroBatchPlan

    class OutOfMemoryOnce(Callback):
        raised = False

        def before_batch(self):
            if self.epoch == 2 and self.training and not OutOfMemoryOnce.raised:
                OutOfMemoryOnce.raised = True
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    seen = []

    class MicroBatches(Callback):
        def before_batch(self):
            if self.training:
                seen.append((self.epoch, len(self.xb[0])))

    monkeypatch.setattr(train, "memory_plan", lambda *a: MicroBatchPlan(64, 64, 1 << 30, 8 << 30, member="m"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    data = load_data(Project(project), load_competition(Project(project), "digits"))
    member = Member(name="m", arch="test_resnet", pretrained=False, size=32, epochs=4, batch_size=64, num_workers=0)
    trained = train.train_member(member, data, checkpoint_dir=tmp_path / "ckpt", cbs=[OutOfMemoryOnce(), MicroBatches()])
    assert trained.memory["micro_batch"] == 32 and trained.memory["oom_restarts"] == 1
    assert trained.resumed_at == "train epoch 3 of 4"
    assert [r["epoch"] for r in trained.history] == [0, 1, 2, 3]
    assert {bs for e, bs in seen if e < 2} == {64} and max(bs for e, bs in seen if e >= 2) == 32


def test_a_fit_starts_without_the_last_fits_leftover_gradients(project, monkeypatch, tmp_path):
    """Gradient accumulation (the CUDA path's plan, forced on the CPU): the frozen phase's last micro-batches come
    after its last optimiser step, and fastai neither steps nor zeroes them at the fit's end; the unfrozen fit's
    first step must not carry them (fastai's GradientAccumulation resets only its count in before_fit)."""
    import timm
    import torch
    from fastai.callback.core import Callback

    from pipelines import train
    from pipelines.config import Member, load_competition
    from pipelines.data import load_data
    from pipelines.memory import MicroBatchPlan

    weights = tmp_path / "body.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    at_start, batches = [], []

    class GradientsAtStart(Callback):
        order = 100  # after every other callback's before_fit

        def before_fit(self):
            batches.append(len(self.dls.train))

        def before_batch(self):
            if self.training and self.iter == 0 and self.epoch == 0:
                grads = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
                at_start.append(float(torch.stack(grads).norm()) if grads else 0.0)

    # 25 × 3 micro-batches per step; a fit of a number of batches that 3 does not divide ends with leftovers
    monkeypatch.setattr(train, "memory_plan", lambda *a: MicroBatchPlan(75, 25, 1 << 30, 8 << 30, member="m"))
    data = load_data(Project(project), load_competition(Project(project), "digits"))
    member = Member(name="m", arch="test_resnet", pretrained=str(weights), freeze_epochs=1, size=32, epochs=1,
                    batch_size=75, num_workers=0)
    trained = train.train_member(member, data, cbs=[GradientsAtStart()])
    assert trained.memory["accumulation"] == "25 × 3" and trained.memory["approximate"]
    assert batches[0] % 3 != 0, batches  # the frozen fit does end with micro-batches not stepped
    assert at_start == [0.0, 0.0]
