"""The GPU tier (issue 23 item 4; `make test-gpu`, marker `gpu`): the CUDA paths run for real on tiny data (digits,
random weights, nothing downloaded). Without CUDA every test is skipped with one line: "no CUDA".

Covered: a member SIGKILLed mid-run resumes and ends as an uninterrupted run does (within the tolerance stated in
the test); the memory plan under a 2 GiB budget accumulates and the peak stays under it; an out-of-memory error
restarts with half the micro-batch; fp16 and bf16; channels-last on and off predict the same; `compile: true`; no
host-device sync in a warm training step; kept weights predict the same on the GPU and the CPU; `--parallel 2`
with a Ray task per GPU where two exist.
"""

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ens, make_project
from pipelines.config import Member, Project, load_competition
from pipelines.data import load_data

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

GIB = 2**30


@pytest.fixture(scope="module")
def digits(tmp_path_factory, digits_data):
    project = Project(make_project(tmp_path_factory.mktemp("gpu") / "project", digits_data))
    return load_data(project, load_competition(project, "digits"))


@pytest.fixture(autouse=True)
def _clean_card():
    """Each test starts on a whole card: no memory cap (a member's budget caps the process), no sync checks."""
    torch.cuda.set_per_process_memory_fraction(1.0)
    yield
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def _member(**kw) -> Member:
    base = dict(name="m", arch="test_resnet", pretrained=False, size=32, epochs=2, batch_size=64, num_workers=0,
                lr=0.005, decode=True, tta={"n": 0},
                aug_transforms={"do_flip": True, "max_rotate": 10, "max_warp": 0.2, "max_lighting": 0.2})
    return Member(**{**base, **kw})


def _train(member, data, cbs=()):
    from pipelines.train import train_member

    return train_member(member, data, cbs=list(cbs))


def _finite_and_learning(trained, accuracy=0.5):
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["valid_loss"]) for r in trained.history)
    assert trained.history[-1]["accuracy"] > accuracy


# --------------------------------------------------------------------------------------------- resume after SIGKILL
ONE = """\
competition: digits
defaults: {pretrained: false, size: 96, epochs: 6, lr: 0.005, batch_size: 32, num_workers: 0, tta: {n: 1},
           decode: true, deterministic: true, aug_transforms: {do_flip: false, max_rotate: 10}}
members:
  - {name: resnet, arch: resnet18}
"""


def _checkpoint(root):
    for path in (root / "cache/digits").glob(".partial-*/checkpoint.pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # being written
            continue
        return state["phase"], state["epochs_done"]
    return None


def test_sigkill_mid_member_then_the_rerun_resumes_and_ends_as_an_uninterrupted_run(digits_data, tmp_path):
    """`ens run` killed (SIGKILL: no handler runs) after a completed epoch; the rerun says it resumed and ends
    within the stated tolerance of an uninterrupted run (deterministic: true; the CUDA generator is checkpointed
    with the others, so the GPU augmentation draws the same): probabilities within 0.02, accuracy within 0.01."""
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"one": ONE})
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "digits/one.yaml"], cwd=root,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ((_checkpoint(root) or ("", 0))[1] >= 1):
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run ended before it could be killed mid-member: " + proc.communicate()[0][-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = _checkpoint(root)
    assert done and done[1] < 6

    rerun = ens("run", "digits/one.yaml", cwd=root, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming an interrupted run at train epoch" in rerun.stdout + rerun.stderr
    resumed = run_ensemble(Project(root), "digits/one.yaml").members[0].entry  # cached now: nothing trains
    assert resumed.meta["resumed_at"].startswith("train epoch ")
    reference = run_ensemble(Project(make_project(tmp_path / "ref", digits_data, {"one": ONE})),
                             "digits/one.yaml").members[0].entry
    assert reference.meta["resumed_at"] is None
    for name in ("valid_plain", "valid_tta", "test_tta"):
        np.testing.assert_allclose(resumed.arrays[name], reference.arrays[name], rtol=0, atol=0.02)
    accuracy = [e.meta["history"][-1]["accuracy"] for e in (resumed, reference)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.01


# --------------------------------------------------------------------------------------------- memory
# resnet34 at 224 px: batch 128 in fp16 needs several GiB (weights, gradients and Adam's moments take ~0.35 GiB,
# each image ~30 MiB of activations), 16 fits in the 1.5 GiB a 2 GiB budget leaves after its safety margin
BIG = dict(arch="resnet34", size=224, batch_size=128, precision="fp16", gpu_memory="2GiB", epochs=1,
           aug_transforms={"do_flip": True})


def test_the_memory_plan_under_2gib_accumulates_and_the_peak_stays_under(digits):
    """Under a 2 GiB budget the plan splits the batch of 128 into micro-batches with gradient accumulation, and
    training's peak (reserved memory: what the card gave the process) stays under 2 GiB."""
    torch.cuda.reset_peak_memory_stats()
    trained = _train(_member(**BIG), digits)
    plan = trained.memory
    assert plan["accumulation_steps"] > 1 and plan["micro_batch"] * plan["accumulation_steps"] >= 128
    assert plan["oom_restarts"] == 0
    assert plan["peak_bytes"] <= 2 * GIB
    assert torch.cuda.max_memory_reserved() <= 2 * GIB


def test_an_out_of_memory_error_restarts_with_half_the_micro_batch(digits, monkeypatch):
    """A plan that claims the whole batch fits (it does not under the 2 GiB cap the probe sets): training runs out
    of memory, restarts from its last completed epoch with half the micro-batch, and finishes."""
    from fastai.callback.core import Callback

    from pipelines import memory

    real = memory.plan_member

    def optimistic(member, *args, **kwargs):
        return dataclasses.replace(real(member, *args, **kwargs), micro_batch=member.batch_size)

    class Cap2GiB(Callback):  # the budget's cap during the fit, whatever the probe left
        order = -100

        def before_fit(self):
            torch.cuda.set_per_process_memory_fraction(2 * GIB / torch.cuda.get_device_properties(0).total_memory)

    monkeypatch.setattr(memory, "plan_member", optimistic)
    trained = _train(_member(**BIG), digits, [Cap2GiB()])
    assert trained.memory["oom_restarts"] >= 1 and trained.memory["micro_batch"] < 128
    assert trained.memory["oom_errors"]
    assert all(math.isfinite(r["train_loss"]) for r in trained.history)


# --------------------------------------------------------------------------------------------- precision, layout
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains(digits, precision):
    from pipelines.memory import bf16_native

    if precision == "bf16" and not bf16_native():
        pytest.skip("no native bf16 on this card")
    trained = _train(_member(precision=precision), digits)
    assert trained.precision == precision and trained.device == "cuda"
    _finite_and_learning(trained)


def test_channels_last_on_and_off_predict_the_same(digits):
    """A convolutional member trains channels-last (accel.accelerate); its predictions with the weights in
    channels-last and in the default layout agree within 1e-4 (fp32, TF32 off for both)."""
    from fastai.callback.channelslast import ChannelsLast

    from pipelines.predict import predict_member

    member = _member(precision="fp32", tta={"n": 2})
    trained = _train(member, digits)
    learn = trained.learn
    conv = next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on = predict_member(learn, member, digits)[0]
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ChannelsLast)])
        learn.model.to(memory_format=torch.contiguous_format)
        assert conv.weight.is_contiguous()
        off = predict_member(learn, member, digits)[0]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for name in on:
        np.testing.assert_allclose(on[name], off[name], rtol=0, atol=1e-4)


def test_compile_true_trains_compiled_and_keeps_plain_state_dict_keys(digits):
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("torch.compile's inductor needs Triton")
    trained = _train(_member(compile=True, precision="fp16"), digits)
    assert getattr(trained.learn.model, "_compiled_call_impl", None) is not None
    assert not [k for k in trained.learn.model.state_dict() if k.startswith("_orig_mod")]
    _finite_and_learning(trained)


# --------------------------------------------------------------------------------------------- no sync per step
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_no_host_device_sync_in_a_warm_training_step(digits, precision):
    """torch's sync debug mode set to raise from the third step of the second epoch to the epoch's end (before
    the Recorder's once-per-epoch read): every warm step (the loader's hand-over and copy, the augmentation, the
    forward, backward and optimizer step, every callback) runs without one. fp16 is left out: GradScaler reads
    back whether the gradients overflowed before each optimizer step (one sync per step, by design)."""
    from fastai.callback.core import Callback

    from pipelines.memory import bf16_native

    if precision == "bf16" and not bf16_native():
        pytest.skip("no native bf16 on this card")

    class NoSync(Callback):
        order = -50  # after_train before OnDeviceRecords (-40) and the Recorder, which read once per epoch

        def __init__(self):
            self.steps = 0

        def before_batch(self):
            if self.training and self.epoch == 1 and self.iter >= 2:
                torch.cuda.set_sync_debug_mode("error")
                self.steps += 1

        def after_train(self):
            torch.cuda.set_sync_debug_mode(0)

    check = NoSync()
    trained = _train(_member(precision=precision), digits, [check])
    assert check.steps > 10
    _finite_and_learning(trained, accuracy=0.3)


# --------------------------------------------------------------------------------------------- kept weights
def test_kept_weights_predict_the_same_on_the_gpu_and_the_cpu(digits, monkeypatch):
    """The weights a member keeps (trained on the GPU), loaded as `ens eval` and the notebook load them
    (`predict.learner_from_weights`), predict the test images the same on the GPU and on the CPU (fp32, TF32 off:
    within 1e-4)."""
    from pipelines.predict import learner_from_weights, paths_probs

    member = _member(precision="fp32", tta={"n": 2}, decode=False)  # kept weights predict image files
    trained = _train(member, digits)
    weights = {k: v.detach().cpu().clone() for k, v in trained.learn.model.state_dict().items()}
    paths = [digits.root / p for p in digits.test_paths]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu_learn = learner_from_weights(member, digits, weights, trained.normalize)
        on_gpu = paths_probs(gpu_learn, member, paths)
        assert next(gpu_learn.model.parameters()).device.type == "cuda"
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: False)
            cpu_learn = learner_from_weights(member, digits, weights, trained.normalize)
            on_cpu = paths_probs(cpu_learn, member, paths)
        assert next(cpu_learn.model.parameters()).device.type == "cpu"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for name in on_gpu:
        np.testing.assert_allclose(on_gpu[name], on_cpu[name], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- Ray, a GPU per task
TWO = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 1, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 1}}
members:
  - {name: resnet, arch: test_resnet}
  - {name: convnext, arch: test_convnext}
"""


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parallel_2_runs_a_ray_task_per_gpu(digits_data, tmp_path):
    """`ens run --parallel 2` on a machine with two GPUs: one Ray task per member, each on its own GPU (Ray sets
    CUDA_VISIBLE_DEVICES per task), both trained on CUDA."""
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"two": TWO})
    out = ens("run", "digits/two.yaml", "--parallel", "2", cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    members = run_ensemble(Project(root), "digits/two.yaml").members  # cached: nothing trains
    assert [m.entry.meta["device"] for m in members] == ["cuda", "cuda"]
